"""bf16 against fp32 on the same trajectories: ``fastdag bench precision [--config C] [key=value ...]``.

    fastdag bench precision --trajectories 16                       # tiny-random, JPEG reward, DAG-KL
    fastdag bench precision reward.name=brightness --out P.md       # a smooth reward

Two trainers, one in fp32 and one with ``model.dtype=bfloat16``, with the same LoRA and flow weights, evaluate every
transition of one fp32-sampled epoch (x̂_0 rewards and the final reward scored by each trainer's own decoder, as
the recompute path does). For each per-transition term (log p_F, log p_B, log F(x_t), log F(x_{t-1}), δ and the
DAG-KL advantages A) it reports the largest bf16 − fp32 difference against the term's spread over the transitions
(its standard deviation): a ratio near 1 means bf16 noise is as large as the signal. Then the gradients that each
objective gives the LoRA (and the flow) in both precisions, by cosine; and, separately, the first-step mismatch
of each precision's own rollout, recorded log p_F against the update's recomputed one.

bf16 arithmetic on a CPU is only real where ``lscpu`` shows ``amx_bf16``/``avx512_bf16``; elsewhere oneDNN computes
in fp32 and rounds, and this measures bf16 storage, not bf16 arithmetic. The report says which.
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import torch

QUICK = ["train.epochs=1", "sample.num_steps=4", "sample.batch_size=8", "train.batch_size=4",
         "train.gradient_accumulation_steps=1", "dag.beta=10", "dag.beta_schedule=constant",
         "dag.flow.block_out_channels=[32,64]", "dag.flow.norm_num_groups=8", "engine.backend=torch"]
TERMS = ("log_pf", "log_pb", "log_flow_t", "log_flow_prev", "delta", "advantage")


def cpu_bf16_arithmetic() -> str:
    """What bf16 means on this CPU: 'native (amx_bf16)' etc., or 'emulated (fp32 compute, bf16 storage)'."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    native = sorted(flags & {"amx_bf16", "avx512_bf16"})
    import os

    if native and os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper().startswith("AVX2"):
        return f"emulated (ONEDNN_MAX_CPU_ISA={os.environ['ONEDNN_MAX_CPU_ISA']}; the CPU has {', '.join(native)})"
    return f"native ({', '.join(native)})" if native else "emulated (no amx_bf16/avx512_bf16: fp32 compute, bf16 storage)"


def _rescored(trainer, trajs):
    """The trajectories as this trainer's model sees them: its prompt dtype, its own final rewards, and no x̂_0
    rewards (so transition_terms recomputes them with this trainer's model, decoder and reward)."""
    from fastdag.rollout import score_latents

    rewards, _ = score_latents(trainer.model, trainer.reward, trajs.latents[:, -1], trajs.prompts,
                               trainer.cfg.reward.batch_size)
    embeds = None if trajs.prompt_embeds is None else trajs.prompt_embeds.to(trainer.model.dtype)
    return dataclasses.replace(trajs, prompt_embeds=embeds, rewards=rewards.to(trainer.device), xhat_rewards=None)


def _terms(trainer, trajs, beta: float) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Every transition's terms [T * B] (timestep-major, as the update's blocks), and the LoRA/flow gradients of
    the DB loss and of the KL-gradient term (ratio 1: the first step of an epoch)."""
    from fastdag.objectives import DagDB, DagKL, ppo_clipped_loss

    n, T = len(trajs), trajs.num_steps
    idx = torch.arange(n).repeat(T)
    steps = torch.arange(T).repeat_interleave(n)
    trainer.engine.module.zero_grad(set_to_none=True)
    terms = trainer.transition_terms(trajs, idx, steps, beta)
    delta = DagDB(0.0).residuals(terms) if trainer.flow is not None else None  # log p_F live: θ's DB gradient
    out = {"log_pf": terms.log_pf.detach(), "log_pb": terms.log_pb.detach()}
    grads: dict[str, torch.Tensor] = {}
    lora = [p for p in trainer.model.denoiser.parameters() if p.requires_grad]
    flow = list(trainer.flow.parameters()) if trainer.flow is not None else []
    if delta is not None:
        out.update(log_flow_t=terms.log_flow_t.detach(), log_flow_prev=terms.log_flow_prev.detach(),
                   delta=delta.detach())
        db = (delta.float() ** 2).mean()
        g = torch.autograd.grad(db, lora + flow, retain_graph=True, allow_unused=True)
        grads["db_lora"] = torch.cat([x.reshape(-1) for x in g[: len(lora)] if x is not None])
        grads["db_flow"] = torch.cat([x.reshape(-1) for x in g[len(lora):] if x is not None])
        kl = DagKL(1.0, 1e-4, trainer.cfg.dag.adv_clip, 0.0, rloo_normaliser=trainer.cfg.dag.rloo_normaliser)
        adv = torch.cat([kl.advantages(block) for block in (-delta.detach()).chunk(T)])
        out["advantage"] = adv
        loss, _ = ppo_clipped_loss(terms.log_pf, terms.log_pf.detach(), adv, 1e-4)
        grads["kl_lora"] = torch.cat([x.reshape(-1) for x in torch.autograd.grad(loss, lora)])
    return out, grads


def first_step_mismatch(cfg) -> dict[str, float]:
    """A trainer's own rollout, then its first micro-step's recomputed log p_F against the recorded one."""
    from fastdag.trainer import Trainer

    trainer = Trainer(cfg)
    trajs = trainer.sample_epoch()
    order, step_order = trainer._plan[0]
    idx = order[: trainer.shard.train_batch]
    steps = step_order[idx, 0]
    with torch.no_grad():
        terms = trainer.transition_terms(trajs, idx, steps, cfg.dag.beta)
    diff = (terms.log_pf.float() - terms.log_pf_old.float()).abs()
    return {"mean": diff.mean().item(), "max": diff.max().item()}


def measure(config: Optional[str], trajectories: int, overrides: Sequence[str]) -> dict:
    from fastdag.config import load_config
    from fastdag.trainer import Trainer

    with tempfile.TemporaryDirectory() as out:
        base = [*([] if config else QUICK), "logging.progress=false", "eval.prompts=null", "dag.algorithm=kl",
                f"logging.output_dir={out}", *overrides]
        per_batch = load_config(config, base).sample.batch_size
        base.append(f"sample.num_batches_per_epoch={max(1, trajectories // per_batch)}")
        cfgs = {name: load_config(config, [*base, f"model.dtype={dtype}"])
                for name, dtype in (("fp32", "float32"), ("bf16", "bfloat16"))}
        trainers = {name: Trainer(cfg) for name, cfg in cfgs.items()}
        fp32, bf16 = trainers["fp32"], trainers["bf16"]
        same = dict(fp32.engine.module.named_parameters())
        with torch.no_grad():  # the same LoRA and flow weights (both fp32)
            for name, param in bf16.engine.module.named_parameters():
                if param.requires_grad:
                    param.copy_(same[name])
        beta = cfgs["fp32"].dag.beta
        trajs = fp32.sample_epoch()
        terms, grads = {}, {}
        for name, trainer in trainers.items():
            terms[name], grads[name] = _terms(trainer, _rescored(trainer, trajs), beta)
        rows = {}
        for key in TERMS:
            if key not in terms["fp32"]:
                continue
            a, b = terms["fp32"][key].float(), terms["bf16"][key].float()
            spread = a.std().item()
            err = (b - a).abs()
            # DAG-KL's baselines are taken per timestep block: the spread that matters is within a block
            block = a.reshape(trajs.num_steps, -1).std(dim=1).mean().item()
            rows[key] = {"fp32_mean": a.mean().item(), "fp32_std": spread, "fp32_block_std": block,
                         "max_abs_diff": err.max().item(), "mean_abs_diff": err.mean().item(),
                         "mean_diff_over_block_std": err.mean().item() / block if block > 0 else float("inf")}
        adv = rows.get("advantage")
        if adv is not None:
            a, b = terms["fp32"]["advantage"], terms["bf16"]["advantage"]
            adv["sign_agreement"] = (torch.sign(a) == torch.sign(b)).float().mean().item()
            adv["correlation"] = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
        cosines = {k: torch.nn.functional.cosine_similarity(grads["fp32"][k], grads["bf16"][k], dim=0).item()
                   for k in grads["fp32"]}
        mismatch = {name: first_step_mismatch(cfg) for name, cfg in cfgs.items()}
    return {"config": config or "defaults + quick", "overrides": list(overrides), "transitions": len(trajs) *
            trajs.num_steps, "trajectories": len(trajs), "steps": trajs.num_steps, "reward": cfgs["fp32"].reward.name,
            "beta": beta, "bf16": cpu_bf16_arithmetic(), "terms": rows, "grad_cosine": cosines,
            "logp_mismatch": mismatch}


def markdown(result: dict) -> str:
    lines = [f"# bf16 vs fp32 on the same trajectories", "",
             f"`fastdag bench precision {'--config ' + result['config'] if result['config'] != 'defaults + quick' else ''}"
             f" --trajectories {result['trajectories']} {' '.join(result['overrides'])}`".replace("  ", " "), "",
             f"{result['trajectories']} trajectories × {result['steps']} steps = {result['transitions']} transitions, "
             f"reward {result['reward']}, β {result['beta']:g}; CPU bf16: {result['bf16']}.", "",
             "| term | fp32 mean | fp32 std, all | fp32 std within a step | max abs bf16−fp32 | mean abs | "
             "mean abs / std within a step |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for key, r in result["terms"].items():
        lines.append(f"| {key} | {r['fp32_mean']:.4g} | {r['fp32_std']:.3g} | {r['fp32_block_std']:.3g} | "
                     f"{r['max_abs_diff']:.3g} | {r['mean_abs_diff']:.3g} | {r['mean_diff_over_block_std']:.3g} |")
    adv = result["terms"].get("advantage")
    if adv:
        lines += ["", f"Advantages: sign agreement {100 * adv['sign_agreement']:.1f}%, correlation "
                      f"{adv['correlation']:.4f}."]
    lines += ["", "Gradient cosine, bf16 vs fp32: " + ", ".join(f"{k} {v:.4f}" for k, v in result["grad_cosine"].items())
              + ".", "", "First-step |recorded − recomputed log p_F| of each precision's own rollout: "
              + ", ".join(f"{k} mean {v['mean']:.2e} / max {v['max']:.2e}" for k, v in result["logp_mismatch"].items())
              + "."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="fastdag bench precision", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="a training config (default: the tiny-random defaults, 4 steps)")
    p.add_argument("--trajectories", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", help="also write the Markdown table here")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure(args.config, args.trajectories, args.overrides)
    text = markdown(result)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0
