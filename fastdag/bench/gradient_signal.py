"""How much signal is in one epoch's policy gradient? ``fastdag bench gradient-signal [...]``.

A black-box policy gradient is an average of per-transition terms w_i·∇_θ log p_θ(x_{t-1} | x_t): for DAG-DB
w_i = 2·δ_i (the LoRA part of the DB loss's gradient), for DAG-KL w_i = −A_i, the ratio-1 gradient of its clipped
surrogate, with A the leave-one-out advantages of −δ over each block of ``train.batch_size`` transitions at one
timestep (as the update forms them). Split an epoch's trajectories into K groups, sum each group's gradient, and
compare the groups: if the expected gradient dominates, the group gradients point the same way (cosine near 1); if
the noise dominates, they are orthogonal (cosine near 0). With n trajectories per group and mean pairwise cosine c,

    |E g|² / Var g  ≈  c / ((1 − c) · n)        per trajectory,

so about n (1 − c) / c trajectories make one optimizer step whose gradient is as much signal as noise.
Also reported: each denoising step's share of the squared gradient norm (which steps drive the update), the cosine
between the DB and the KL epoch gradients (do they point the same way?), and the residuals' size (the flow's fit).
``--checkpoint`` measures a trained state (LoRA and flow weights, β at that epoch) instead of the base.

    fastdag bench gradient-signal --config configs/shapes_align.yaml --trajectories 64 --threads 2
    fastdag bench gradient-signal --config configs/shapes_aesthetic.yaml --checkpoint runs/X/checkpoints/epoch-0030
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


def measure(config: str, trajectories: int, groups: int, beta: Optional[float], overrides: Sequence[str],
            checkpoint: Optional[str] = None) -> dict:
    from fastdag.config import load_config
    from fastdag.objectives import DagKL, beta_at
    from fastdag.samplers import step_weights
    from fastdag.trainer import Trainer

    per_batch = load_config(config, list(overrides)).sample.batch_size  # the overrides may set it
    if trajectories % per_batch or trajectories % groups:
        raise SystemExit(f"--trajectories must be a multiple of sample.batch_size={per_batch} and of --groups={groups}")
    cfg = load_config(config, [
        "engine.backend=torch", "logging.progress=false", "eval.prompts=null", "dag.xhat_states=all",
        f"sample.num_batches_per_epoch={trajectories // per_batch}", *overrides,
    ])
    if cfg.dag.algorithm not in ("db", "kl"):
        raise SystemExit("gradient-signal measures the DAG policy gradients: use a config with dag.algorithm db or kl")
    trainer = Trainer(cfg)
    if checkpoint is not None:  # the trained LoRA and flow, and β where that run's schedule had it
        trainer.restore(Path(checkpoint))
        if beta is None:
            beta = beta_at(trainer.epoch, cfg.dag, trainer.beta_horizon)
    beta = cfg.dag.beta if beta is None else beta
    kl = DagKL(1.0, cfg.dag.ratio_clip, cfg.dag.adv_clip, 0.0, "reference", rloo_normaliser=cfg.dag.rloo_normaliser)
    block = cfg.train.batch_size
    params = [p for p in trainer.model.denoiser.parameters() if p.requires_grad]
    t0 = time.perf_counter()
    trajs = trainer.sample_epoch()
    n, T = len(trajs), trajs.num_steps
    weights = {"uniform": torch.ones(T), "score_scale": step_weights(trainer.sampler.score_scale(), "score_scale")}
    rewards = trajs.rewards.float()
    with torch.no_grad():  # every transition's residual δ [T, n]
        delta = torch.stack([(lambda t: (t.log_flow_t + t.log_pf - t.log_pb - t.log_flow_prev).float())(
            trainer.transition_terms(trajs, torch.arange(n), torch.full((n,), s), beta)) for s in range(T)])
    # Per-transition weights w [T, n] of each policy gradient Σ w ∇_θ log p_θ (ratio 1, no clip):
    centred = torch.stack([torch.cat([b - (b.sum() - b) / (len(b) - 1) for b in (-delta[s]).split(block)])
                           for s in range(T)])  # −δ minus its leave-one-out baseline within each update block
    pooled = centred / (centred.std() + 1e-8)
    per_trajectory = (rewards - rewards.mean()) / (rewards.std() + 1e-8)
    objectives = {
        "db": 2 * delta,  # ∇_θ Σ δ² through log p_θ
        "kl": -torch.stack([torch.cat([kl.advantages(b) for b in (-delta[s]).split(block)]) for s in range(T)]),
        # KL's advantages with one scale for all timesteps (the residuals' spread differs ~10x between steps)
        "kl_pooled": -pooled.clamp(-cfg.dag.adv_clip, cfg.dag.adv_clip),
        # the final reward's own policy gradient (REINFORCE, DDPO without clipping): the direction the reward asks for
        "reinforce": -per_trajectory.expand(T, n),
    }
    # sums[objective][g][s]: group g's summed policy gradient at step s (unweighted; weightings combine the steps)
    sums = {name: [[None] * T for _ in range(groups)] for name in objectives}
    for s in range(T):
        for g in range(groups):
            idx = torch.arange(g, n, groups)
            log_pf = trainer.transition_terms(trajs, idx, torch.full((len(idx),), s), beta).log_pf
            for k, (name, w) in enumerate(objectives.items()):
                grads = torch.autograd.grad((w[s, idx] * log_pf).sum(), params, retain_graph=k < len(objectives) - 1)
                sums[name][g][s] = torch.cat([x.reshape(-1) for x in grads]).float()
    rows: dict = {}
    epoch_gradients: dict = {}
    for objective in objectives:
        for name, w in weights.items():
            if w is None:
                continue
            group_grads = [sum(w[s].item() * sums[objective][g][s] for s in range(T)) for g in range(groups)]
            cosines = [torch.nn.functional.cosine_similarity(a, b, dim=0).item()
                       for a, b in itertools.combinations(group_grads, 2)]
            c = sum(cosines) / len(cosines)
            total = [sum(w[s].item() * sums[objective][g][s] for g in range(groups)) for s in range(T)]
            norms = torch.tensor([x.square().sum().item() for x in total])
            rows[f"{objective}.{name}"] = {"cosine": c, "trajectories_per_unit_snr": trajectories_per_unit_snr(
                c, n // groups), "step_share": (norms / norms.sum()).tolist()}
            epoch_gradients[objective, name] = sum(total)
    cos = torch.nn.functional.cosine_similarity
    agreement = {name: {f"{a}~{b}": cos(epoch_gradients[a, name], epoch_gradients[b, name], dim=0).item()
                        for a, b in (("db", "kl"), ("db", "reinforce"), ("kl", "reinforce"), ("kl_pooled", "reinforce"),
                                     ("db", "kl_pooled"))}
                 for name in weights if weights[name] is not None}
    return {"config": config, "overrides": list(overrides), "checkpoint": checkpoint, "trajectories": n,
            "groups": groups, "beta": beta, "steps": T, "threads": torch.get_num_threads(),
            "seconds": time.perf_counter() - t0, "reward_mean": rewards.mean().item(), "weightings": rows,
            "agreement": agreement,
            "residual_abs_mean": delta.abs().mean().item(),
            "residual_abs_by_step": delta.abs().mean(dim=1).tolist(),
            # how much of each step's residual spread the trajectory's reward explains (the flow's fit: a fitted
            # flow leaves δ ≈ 0; a residual that is all reward signal correlates with r, one that is noise does not)
            "residual_reward_correlation_by_step": [
                torch.corrcoef(torch.stack([-delta[s], rewards]))[0, 1].item() for s in range(T)]}


def markdown(result: dict) -> str:
    where = f" at {result['checkpoint']}" if result.get("checkpoint") else " at the base model"
    lines = [
        "# Signal in one epoch's DAG policy gradients (DB and KL)",
        "",
        f"`fastdag bench gradient-signal --config {result['config']} --trajectories {result['trajectories']} "
        f"--groups {result['groups']}{' --checkpoint ' + result['checkpoint'] if result.get('checkpoint') else ''}` "
        f"{' '.join(result['overrides'])}".rstrip(),
        "",
        f"{result['trajectories']} trajectories of {result['steps']} steps{where}, β = {result['beta']:g} (mean "
        f"reward {result['reward_mean']:.3f}), split into {result['groups']} groups; {result['threads']} threads, "
        f"{result['seconds']:.0f} s. Mean |δ| {result['residual_abs_mean']:.3g}.",
        "",
        "| objective, step weighting | mean pairwise cosine of group gradients | trajectories per optimizer step for "
        "SNR 1 | largest step share of ‖g‖² |",
        "|---|---|---|---|",
    ]
    for name, r in result["weightings"].items():
        share = r["step_share"]
        top = max(range(len(share)), key=share.__getitem__)
        lines.append(f"| {name} | {r['cosine']:.3f} | {r['trajectories_per_unit_snr']:.0f} | "
                     f"step {top}: {100 * share[top]:.0f}% |")
    lines += ["", "Cosine between the epoch gradients (reinforce: the final reward's own policy gradient, the direction "
              "the reward asks for; kl_pooled: KL's advantages with one scale over all timesteps):", "",
              "| step weighting | " + " | ".join(next(iter(result["agreement"].values()))) + " |",
              "|---|" + "---|" * len(next(iter(result["agreement"].values())))]
    for name, pairs in result["agreement"].items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in pairs.values()) + " |")
    lines += ["", "By denoising step (0 = the noisiest): share of the squared gradient norm, mean |δ|, and the "
              "correlation of −δ with the trajectory's final reward:", "",
              "| step | " + " | ".join(result["weightings"]) + " | mean abs δ | corr(−δ, r) |",
              "|---|" + "---|" * (len(result["weightings"]) + 2)]
    for s in range(result["steps"]):
        lines.append(f"| {s} | " + " | ".join(f"{100 * r['step_share'][s]:.1f}%" for r in result["weightings"].values())
                     + f" | {result['residual_abs_by_step'][s]:.3g} | "
                       f"{result['residual_reward_correlation_by_step'][s]:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="fastdag bench gradient-signal", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/shapes_align.yaml")
    p.add_argument("--trajectories", type=int, default=64)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--beta", type=float, default=None,
                   help="β of the residuals (default: dag.beta, the final one; with --checkpoint: β at its epoch)")
    p.add_argument("--checkpoint", default=None, help="measure this checkpoint's LoRA and flow instead of the base")
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
        result = measure(args.config, args.trajectories, args.groups, args.beta, args.overrides, args.checkpoint)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    text = markdown(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
