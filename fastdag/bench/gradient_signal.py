"""How much signal is in one epoch's policy gradient? ``fastdag bench gradient-signal [...]``.

A black-box policy gradient is an average of per-transition terms 2·δ·∇_θ log p_θ(x_{t-1} | x_t) (the LoRA part of
the DB loss's gradient). Split an epoch's trajectories into K groups, sum each group's gradient, and compare the
groups: if the expected gradient dominates, the group gradients point the same way (cosine near 1); if the noise
dominates, they are orthogonal (cosine near 0). With n trajectories per group and mean pairwise cosine c,

    |E g|² / Var g  ≈  c / ((1 − c) · n)        per trajectory,

so about n (1 − c) / c trajectories make one optimizer step whose gradient is as much signal as noise.
Also reported: each denoising step's share of the squared gradient norm (which steps drive the update).

    fastdag bench gradient-signal --config configs/shapes_align.yaml --trajectories 64 --threads 2
"""
from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from fastdag.bench import harness

RESULTS = harness.RESULTS_DIR
WEIGHTINGS = ("uniform", "score_scale")


def trajectories_per_unit_snr(cosine: float, per_group: int) -> float:
    """Trajectories whose summed gradient has signal² = noise², from the mean pairwise cosine of group sums."""
    if cosine <= 0:
        return float("inf")
    return per_group * (1 - cosine) / cosine


def measure(config: str, trajectories: int, groups: int, beta: Optional[float], overrides: Sequence[str]) -> dict:
    from fastdag.config import load_config
    from fastdag.samplers import step_weights
    from fastdag.trainer import Trainer

    per_batch = load_config(config, list(overrides)).sample.batch_size  # the overrides may set it
    if trajectories % per_batch or trajectories % groups:
        raise SystemExit(f"--trajectories must be a multiple of sample.batch_size={per_batch} and of --groups={groups}")
    cfg = load_config(config, [
        "engine.backend=torch", "logging.progress=false", "eval.prompts=null", "dag.xhat_states=all",
        f"sample.num_batches_per_epoch={trajectories // per_batch}", *overrides,
    ])
    if cfg.dag.algorithm != "db":
        raise SystemExit("gradient-signal measures the DAG-DB policy gradient: use a config with dag.algorithm: db")
    trainer = Trainer(cfg)
    beta = cfg.dag.beta if beta is None else beta
    params = [p for p in trainer.model.denoiser.parameters() if p.requires_grad]
    t0 = time.perf_counter()
    trajs = trainer.sample_epoch()
    n, T = len(trajs), trajs.num_steps
    weights = {"uniform": torch.ones(T), "score_scale": step_weights(trainer.sampler.score_scale(), "score_scale")}
    # sums[g][s]: group g's summed policy gradient at step s (unweighted; weightings combine the steps afterwards)
    sums = [[None] * T for _ in range(groups)]
    for s in range(T):
        for g in range(groups):
            idx = torch.arange(g, n, groups)
            terms = trainer.transition_terms(trajs, idx, torch.full((len(idx),), s), beta)
            delta = trainer.objective.residuals(terms).detach()
            # ∇_θ Σ_i δ_i² through log p_θ only = Σ_i 2 δ_i ∇_θ log p_θ,i: the θ part of the DB loss's gradient
            grads = torch.autograd.grad((2 * delta * terms.log_pf).sum(), params)
            sums[g][s] = torch.cat([x.reshape(-1) for x in grads]).float()
    rows = {}
    for name, w in weights.items():
        if w is None:
            continue
        group_grads = [sum(w[s].item() * sums[g][s] for s in range(T)) for g in range(groups)]
        cosines = [torch.nn.functional.cosine_similarity(a, b, dim=0).item()
                   for a, b in itertools.combinations(group_grads, 2)]
        c = sum(cosines) / len(cosines)
        total = [sum(w[s].item() * sums[g][s] for g in range(groups)) for s in range(T)]
        norms = torch.tensor([x.square().sum().item() for x in total])
        rows[name] = {"cosine": c, "trajectories_per_unit_snr": trajectories_per_unit_snr(c, n // groups),
                      "step_share": (norms / norms.sum()).tolist()}
    return {"config": config, "overrides": list(overrides), "trajectories": n, "groups": groups, "beta": beta,
            "steps": T, "threads": torch.get_num_threads(), "seconds": time.perf_counter() - t0,
            "reward_mean": trajs.rewards.mean().item(), "weightings": rows}


def markdown(result: dict) -> str:
    lines = [
        "# Signal in one epoch's DAG-DB policy gradient",
        "",
        f"`fastdag bench gradient-signal --config {result['config']} --trajectories {result['trajectories']} "
        f"--groups {result['groups']}` {' '.join(result['overrides'])}".rstrip(),
        "",
        f"{result['trajectories']} trajectories of {result['steps']} steps at β = {result['beta']:g} (mean reward "
        f"{result['reward_mean']:.3f}), split into {result['groups']} groups; {result['threads']} threads, "
        f"{result['seconds']:.0f} s.",
        "",
        "| step weighting | mean pairwise cosine of group gradients | trajectories per optimizer step for SNR 1 |"
        " largest step share of ‖g‖² |",
        "|---|---|---|---|",
    ]
    for name, r in result["weightings"].items():
        share = r["step_share"]
        top = max(range(len(share)), key=share.__getitem__)
        lines.append(f"| {name} | {r['cosine']:.3f} | {r['trajectories_per_unit_snr']:.0f} | "
                     f"step {top}: {100 * share[top]:.0f}% |")
    lines += ["", "Share of the squared gradient norm by denoising step (0 = the noisiest):", "",
              "| step | " + " | ".join(result["weightings"]) + " |", "|---|" + "---|" * len(result["weightings"])]
    for s in range(result["steps"]):
        lines.append(f"| {s} | " + " | ".join(f"{100 * r['step_share'][s]:.1f}%" for r in result["weightings"].values())
                     + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="fastdag bench gradient-signal", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/shapes_align.yaml")
    p.add_argument("--trajectories", type=int, default=64)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--beta", type=float, default=None, help="β of the residuals (default: dag.beta, the final one)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(RESULTS / "gradient_signal.md"))
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = p.parse_args(argv)
    if args.groups < 2:
        p.error("--groups must be at least 2")
    if args.threads:
        torch.set_num_threads(args.threads)
    from fastdag.config import ConfigError

    try:
        result = measure(args.config, args.trajectories, args.groups, args.beta, args.overrides)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    text = markdown(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
