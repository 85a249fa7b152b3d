"""``fastdag evaluate RUN_DIR | CHECKPOINT``: the held-out evaluation of a trained LoRA, written to
``evaluation.json``.

The run's saved ``config.yaml`` says how to build the base model, the reward, the held-out prompts (``eval.prompts``)
and the metric (``eval.metric``; for the shapes world its judge's figures); a run directory means its newest
complete checkpoint. ``key=value`` overrides apply on top (e.g. ``eval.samples_per_prompt=8``); ``--base`` evaluates
the base model alone (the LoRA left at its initialisation, which changes no output), with the same prompts and noise.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Optional

from fastdag.config import ConfigError, load_config

log = logging.getLogger(__name__)


def resolve(target: str) -> tuple[Path, Path]:
    """(run directory, checkpoint directory) of a run directory (its newest complete checkpoint) or a checkpoint."""
    from fastdag.checkpoint import latest_checkpoint

    path = Path(target).expanduser()
    if (path / "config.yaml").is_file():
        checkpoint = latest_checkpoint(path / "checkpoints") if (path / "checkpoints").is_dir() else None
        if checkpoint is None:
            raise ConfigError(f"evaluate: {path} has no complete checkpoint to evaluate")
        return path, checkpoint
    if (path / "pytorch_lora_weights.safetensors").is_file() and (path.parent.parent / "config.yaml").is_file():
        return path.parent.parent, path
    raise ConfigError(f"evaluate: {target!r} is neither a run directory (with config.yaml) nor one of its "
                      "checkpoints (runs/NAME/checkpoints/epoch-NNNN)")


def evaluate(target: str, overrides: list[str], base: bool = False) -> dict[str, Any]:
    """Build the run's model, load the checkpoint's LoRA (unless ``base``), evaluate; the JSON-able result."""
    cfg, run_dir, checkpoint, evaluation = sample_checkpoint(target, overrides, base)
    return {
        "run": str(run_dir), "checkpoint": None if base else str(checkpoint), "prompts": cfg.eval.prompts,
        "samples": len(evaluation.prompts), "scores": evaluation.scores,
        "summary": getattr(evaluation, "summary", None),
    }


def sample_checkpoint(target: str, overrides: list[str], base: bool = False):
    """The run's config (with `overrides`), run directory, checkpoint and the `Evaluation` of its held-out
    prompts (images, prompts, scores): what `evaluate` reports and what `fastdag.toy.hacked_bank` collects."""
    import torch

    from fastdag.evaluation import Evaluator
    from fastdag.families import build_model, load_lora_into
    from fastdag.rewards import CheckedReward, build_reward

    from fastdag.state_io import load_tensors

    run_dir, checkpoint = resolve(target)
    cfg = load_config(run_dir / "config.yaml", [*overrides, "train.resume=null"])
    if not cfg.eval.prompts:
        raise ConfigError("eval.prompts: the run has no held-out prompts; give eval.prompts=NAME_OR_FILE")
    lora = checkpoint / "pytorch_lora_weights.safetensors"
    if not base and lora.is_file():
        load_tensors(lora)  # a truncated or foreign file is one line naming it, before the model loads
    torch.manual_seed(cfg.train.seed)
    model, _ = build_model(cfg.model, cfg.lora)
    if not base:
        try:
            load_lora_into(model, checkpoint)
        except RuntimeError as e:  # a tensor of another shape: another model or LoRA rank
            last = str(e).strip().splitlines()[-1].strip()[:200]
            raise ConfigError(f"{lora}: LoRA weights for another model or LoRA config ({last})") from None
    reward = CheckedReward(cfg.reward.name, build_reward(cfg.reward.name, cfg.reward.kwargs), cfg.reward.batch_size)
    uncond = model.encode_negative(cfg.sample.negative_prompt) if model.conditional else None
    return cfg, run_dir, checkpoint, Evaluator(cfg, model, reward, uncond)()


def main(argv: Optional[list[str]] = None) -> int:
    from fastdag.cli import _fail

    p = argparse.ArgumentParser(prog="fastdag evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("target", help="a run directory or one of its checkpoints")
    p.add_argument("--base", action="store_true", help="evaluate the base model (no LoRA) with the same settings")
    p.add_argument("--out", default=None, help="where to write the JSON (default: TARGET's run dir/evaluation-*.json)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. eval.samples_per_prompt=8")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from fastdag.rewards import RewardError

    try:
        result = evaluate(args.target, args.overrides, base=args.base)
    except (ConfigError, RewardError) as e:
        return _fail(str(e))
    run_dir = Path(result["run"])
    name = "base" if args.base else Path(result["checkpoint"]).name
    out = Path(args.out) if args.out else run_dir / f"evaluation-{name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(", ".join(f"{k} {v:.4g}" for k, v in result["scores"].items()))
    print(f"evaluation: {out}")
    return 0
