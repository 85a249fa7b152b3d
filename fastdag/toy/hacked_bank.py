"""The bank of hacked samples: what a model that gamed a reward draws, kept as negatives of the reward's realism.

A realism output trained only on synthetic negatives (noise, blur, blobs, broken renders) may pass what a hacked
model draws. Round 1 (the shipped bank): DAG-DB against JPEG incompressibility at LoRA lr 1e-2 broke
shapes-tiny's samples into textured smears (16 epochs; the judge's realism 0.93 -> 0.03); collected here and added
to the reward classifier's training (`classifier.train_classifier`, type "hacked"). The first classifier already
refused these; the same run's milder samples at 8 epochs (judge realism 0.52) are where both networks hesitate,
and are the material of a next round. The train split is sampled on the run's training prompts, the held-out
split on its held-out prompts, so the held-out realism figure is on images of prompts the bank never trained on.

    python -m fastdag.toy.hacked_bank RUN_DIR_OR_CHECKPOINT [--per-prompt N] [--out PNG]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from fastdag.toy.negatives import HACKED_BANK, save_bank


def collect(target: str, per_prompt: int) -> tuple[torch.Tensor, list[str], dict]:
    """Samples the checkpoint on its config's training and held-out prompts: (uint8 images, splits, provenance)."""
    from fastdag.config import load_config
    from fastdag.evaluate import resolve, sample_checkpoint

    images, splits, sets = [], [], {}
    run_dir, checkpoint = resolve(target)
    cfg = load_config(run_dir / "config.yaml", ["train.resume=null"])
    for split, prompts in (("train", cfg.prompts.source), ("heldout", cfg.eval.prompts)):
        _, _, _, evaluation = sample_checkpoint(
            target, [f"eval.prompts={prompts}", f"eval.samples_per_prompt={per_prompt}", "eval.metric=null"]
        )
        images.append((evaluation.images.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu())
        splits += [split] * len(evaluation.prompts)
        sets[split] = prompts
    provenance = {
        "what": "samples of a model that hacked a reward: the 'hacked' negatives of the reward classifier's realism",
        "run": str(run_dir), "checkpoint": str(checkpoint), "reward": cfg.reward.name,
        "algorithm": cfg.dag.algorithm, "epochs": cfg.train.epochs, "learning_rate": cfg.train.learning_rate,
        "prompts": sets, "samples_per_prompt": per_prompt, "sampling_steps": cfg.eval.num_steps or cfg.sample.num_steps,
    }
    return torch.cat(images), splits, provenance


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastdag.toy.hacked_bank", description=__doc__.split("\n\n")[0])
    p.add_argument("target", help="a run directory (its newest checkpoint) or a checkpoint directory")
    p.add_argument("--per-prompt", type=int, default=32, help="samples per prompt of each split")
    p.add_argument("--out", default=str(HACKED_BANK), help="the bank's PNG (a JSON is written beside it)")
    p.add_argument("--note", default="", help="how the run was made (its command), kept in the JSON")
    args = p.parse_args(argv)
    images, splits, provenance = collect(args.target, args.per_prompt)
    save_bank(images, splits, Path(args.out), {**provenance, "note": args.note})
    print(f"{args.out}: {images.shape[0]} images ({splits.count('train')} train, {splits.count('heldout')} held-out)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
