"""Throughput suite: rollout and update rates, epoch time, memory, per-phase breakdown, MFU, official vs fastdag.

    fastdag bench tiny                  # CPU: the tiny-random preset
    fastdag bench sd15                  # GPU: SD 1.5's architecture (random weights), batch 8, 50 steps

For each mode (``fastdag``: the defaults; ``official``: the official code's cost — ``dag.xhat_rewards=recompute``,
``kernels.backend=reference``, no CUDA graphs, no overlap, one timestep per backward
(``train.timesteps_per_micro_step=1``); on CUDA also ``fastdag_graphs``: the defaults plus
``sample.cuda_graphs=true``) one trainer is built on the same seeds. After one warm-up epoch each, epochs of the
modes are interleaved (A B A B ...) so drifting load hits them alike, with the device synchronised before every
clock read. Then, per mode, one epoch under the :class:`~fastdag.profiling.PhaseTimer` (the phase breakdown) and
one under ``FlopCounterMode`` (FLOPs; MFU = FLOPs / (median epoch seconds × measured matmul rate)). Alone: the
UNet-only CFG forward rate (the rollout's ceiling) and, on CUDA, eager vs CUDA-graph rollouts at several batch
sizes. Rows (one per metric, long format) go to ``docs/results/bench/throughput.csv``; the chart and the Markdown
summary are drawn from that file (:mod:`fastdag.bench.report`).
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from fastdag.bench import harness

THROUGHPUT_FIELDS = (
    "timestamp", "git_revision", "hardware", "device", "torch_version", "triton_version", "run_id", "benchmark",
    "preset", "mode", "config", "metric", "value", "unit",
)
DEFAULT_RESULTS = harness.RESULTS_DIR / "throughput.csv"

_COMMON = ["logging.progress=false", "logging.grid_size=0", "checkpoint.save_final=false", "engine.backend=torch",
           "dag.algorithm=db", "dag.beta_schedule=constant", "reward.name=jpeg_compressibility", "prompts.source=tiny"]
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "doc": "tiny-random (0.8 M-parameter latent UNet, 4×8×8 latents), 10 steps, batch 8; CPU-sized",
        "overrides": [*_COMMON, "model.pretrained=tiny-random", "sample.num_steps=10", "sample.batch_size=8",
                      "sample.num_batches_per_epoch=1", "train.batch_size=4", "train.gradient_accumulation_steps=1",
                      "dag.beta=10", "dag.flow.block_out_channels=[32,64]", "dag.flow.norm_num_groups=8",
                      # all 10 trained timesteps of a minibatch in one backward: a CPU idles on micro-batches of 4
                      "train.timesteps_per_micro_step=10"],
        "graph_batches": [1, 2, 8],
    },
    "sd15": {
        "doc": "sd15-random (SD 1.5's architecture, random weights, bf16 on GPU), 50 DDIM steps, CFG 5, batch 8",
        "overrides": [*_COMMON, "model.pretrained=sd15-random", "sample.num_steps=50", "sample.batch_size=8",
                      "sample.num_batches_per_epoch=1", "train.batch_size=8", "train.gradient_accumulation_steps=1",
                      "dag.beta=100"],
        "graph_batches": [1, 2, 8],
    },
    # Flow-GRPO's training settings: 512 px, 10 SDE steps, LoRA r 32 / alpha 64 on the MM-DiT attention
    "sd35m": {
        "doc": "sd35-medium-random (SD3.5 Medium's architecture, random weights initialised on the GPU, bf16), 512 px, "
               "10 flow-SDE steps, CFG 4.5, batch 8",
        "overrides": [*_COMMON, "model.pretrained=sd35-medium-random", "model.resolution=512",
                      "model.offload_text_encoders=true", "lora.rank=32", "lora.alpha=64", "sample.num_steps=10",
                      "sample.guidance_scale=4.5", "sample.batch_size=8", "sample.num_batches_per_epoch=1",
                      "train.batch_size=8", "train.gradient_accumulation_steps=1", "dag.beta=100"],
        "graph_batches": [1, 8],
    },
    "flux-dev": {
        "doc": "flux-dev-random (FLUX.1-dev's architecture, random weights initialised on the GPU, bf16), 512 px, "
               "10 flow-SDE steps, distilled guidance 3.5, batch 4",
        "overrides": [*_COMMON, "model.pretrained=flux-dev-random", "model.resolution=512",
                      "model.offload_text_encoders=true", "lora.rank=32", "lora.alpha=64", "sample.num_steps=10",
                      "sample.guidance_scale=3.5", "sample.batch_size=4", "sample.num_batches_per_epoch=1",
                      "train.batch_size=4", "train.gradient_accumulation_steps=1", "dag.beta=100"],
        "graph_batches": [1, 4],
    },
}
# A CPU row per family: the tiny preset's sizes on each family's tiny model
for _family in ("sdxl", "sd3", "flux"):
    PRESETS[f"tiny-{_family}"] = {
        "doc": f"tiny-random-{_family}, the tiny preset's sizes; CPU-sized",
        "overrides": [*PRESETS["tiny"]["overrides"], f"model.pretrained=tiny-random-{_family}"],
        "graph_batches": [1, 2, 8],
    }
MODES: dict[str, list[str]] = {
    "fastdag": [],
    "official": ["dag.xhat_rewards=recompute", "kernels.backend=reference", "sample.cuda_graphs=false",
                 "dag.xhat_overlap=false", "train.timesteps_per_micro_step=1"],
}
GRAPH_MODE = ("fastdag_graphs", ["sample.cuda_graphs=true"])


class CountingReward:
    """Wraps the trainer's reward and counts the images it scores (to show both modes score the same rewards)."""

    def __init__(self, reward):
        self.reward, self.images = reward, 0

    def __call__(self, images, prompts):
        self.images += images.shape[0]
        return self.reward(images, prompts)


def _epoch(trainer, beta: float) -> tuple[float, float, Any]:
    """(rollout seconds, update seconds, trajectories) of one epoch, device synchronised at the clock reads."""
    dev = trainer.device
    harness.synchronize(dev)
    t0 = time.perf_counter()
    trajs = trainer.sample_epoch()
    harness.synchronize(dev)
    t1 = time.perf_counter()
    trainer.train_epoch(trajs, beta)
    harness.synchronize(dev)
    return t1 - t0, time.perf_counter() - t1, trajs


def counted_epoch(trainer, beta: float) -> tuple[int, tuple[float, float, Any]]:
    """(FLOPs, :func:`_epoch`'s result) of one epoch (rollout + update, forward and backward) counted by
    ``torch.utils.flop_counter``. CUDA-graph replays and work on the scoring thread are invisible to it (dispatch
    modes are per thread), so graphs and the overlap are off while counting (the FLOPs and samples are the same)."""
    from torch.utils.flop_counter import FlopCounterMode

    sample, dag = trainer.cfg.sample, trainer.cfg.dag
    saved = sample.cuda_graphs, dag.xhat_overlap
    sample.cuda_graphs, dag.xhat_overlap = False, False
    try:
        with FlopCounterMode(display=False) as counter:
            result = _epoch(trainer, beta)
    finally:
        sample.cuda_graphs, dag.xhat_overlap = saved
    return counter.get_total_flops(), result


def count_epoch_flops(trainer, beta: float) -> int:
    """FLOPs of one epoch (see :func:`counted_epoch`)."""
    return counted_epoch(trainer, beta)[0]


@torch.no_grad()
def unet_only_seconds(trainer, batch: int, warmup: int, repeat: int) -> float:
    """Median seconds of one guided denoiser forward at ``batch`` trajectories: the rollout's ceiling per step."""
    model, cfg = trainer.model, trainer.cfg
    x = torch.randn((batch, *model.latent_shape), device=model.device)
    t = trainer.sampler.timesteps[:1].expand(batch)
    cond = model.encode_prompts(trainer.prompts.sample(batch))
    model.denoiser.eval()
    timing = harness.time_fn(lambda: model.predict(x, t, cond, trainer.uncond, cfg.sample.guidance_scale),
                             trainer.device, warmup=warmup, repeat=repeat, flush_bytes=0)
    return timing.median_ms / 1e3


@torch.no_grad()
def rollout_batch_seconds(trainer, batch: int, cuda_graphs: bool, warmup: int, repeat: int) -> float:
    """Median seconds of denoising one batch of ``batch`` trajectories (no scoring), eager or CUDA-graphed."""
    from fastdag.rollout import rollout_batch

    cfg = trainer.cfg
    prompts = trainer.prompts.sample(batch)
    trainer.model.denoiser.eval()

    def run():
        rollout_batch(trainer.model, trainer.sampler, prompts, guidance_scale=cfg.sample.guidance_scale,
                      uncond=trainer.uncond, generator=trainer.noise, keep_xhat=True, cuda_graphs=cuda_graphs)

    return harness.time_fn(run, trainer.device, warmup=warmup, repeat=repeat, flush_bytes=0).median_ms / 1e3


def graph_sweep(trainer, batches: Sequence[int], repeat: int, add: Callable[[str, str, float, str], None]) -> None:
    """Eager vs CUDA-graph denoising rate at each batch size: ``add(mode, metric, value, unit)`` per figure, eager
    first, as soon as it is measured. Without CUDA only the eager rates (graphs cannot even be constructed)."""
    for batch in batches:
        for graphs in (False, True) if trainer.device.type == "cuda" else (False,):
            seconds = rollout_batch_seconds(trainer, batch, graphs, warmup=2, repeat=repeat)
            add("cuda_graphs" if graphs else "eager", f"denoise_traj_per_s.b{batch}", batch / seconds, "traj/s")


def sampled_alike(a, b) -> bool:
    """Whether two trainers draw the same samples from the same seeds: the same resolved DDIM-step implementation
    (Triton and the reference differ in the last bits, which 50 steps and a JPEG-size reward turn into different
    rewards) and the same CUDA-graph setting. The x̂_0-reward mode, overlap and micro-batching do not touch
    sampling."""
    from fastdag.kernels import resolve_backend

    def key(t):
        return resolve_backend(t.cfg.kernels.backend, t.device), bool(t.cfg.sample.cuda_graphs)

    return key(a) == key(b)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fastdag bench", description=__doc__.split("\n\n")[0])
    p.add_argument("preset", choices=sorted(PRESETS))
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per mode (after one warm-up epoch each)")
    p.add_argument("--modes", nargs="+", default=None,
                   help="modes to run (default: fastdag official, plus fastdag_graphs on CUDA)")
    p.add_argument("--graph-batches", type=int, nargs="*", default=None,
                   help="batch sizes of the eager vs CUDA-graph rollout sweep (CUDA only; default: the preset's)")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP-counted epoch (and MFU)")
    p.add_argument("--flops-in-warmup", action="store_true",
                   help="count FLOPs during the warm-up epoch instead of an extra epoch (modes without CUDA graphs)")
    p.add_argument("--no-profile", action="store_true", help="skip the profiled epoch (the phase breakdown)")
    p.add_argument("--repeat", type=int, default=5, help="timed calls of the UNet-only and graph measurements")
    p.add_argument("--results", default=str(DEFAULT_RESULTS), help="CSV the rows are appended to")
    p.add_argument("--chart", default=None, help="PNG drawn from the results file after the run")
    p.add_argument("--summary", default=None, help="Markdown summary drawn from the results file after the run")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides applied to every mode")
    return p.parse_intermixed_args(argv)


def run(argv: Optional[Sequence[str]] = None, on_row: Optional[Callable[[dict[str, Any]], None]] = None,
        on_epoch: Optional[Callable[[str, int, float, float], None]] = None) -> dict[str, dict[str, float]]:
    """Run the suite; ``on_row(row)`` is called with each result row as soon as it is computed (the rows are
    appended to ``--results`` at the end), ``on_epoch(mode, epoch, rollout_s, update_s)`` after each epoch (0: the
    warm-up), so a caller with a deadline keeps what was measured."""
    from fastdag.config import load_config
    from fastdag.profiling import PhaseTimer, nvml_telemetry, peak_memory_mib, reset_peak_memory
    from fastdag.trainer import Trainer

    args = parse_args(argv)
    preset = PRESETS[args.preset]
    base = [*preset["overrides"], *args.overrides]
    modes = dict(MODES)
    probe = load_config(None, base)
    cuda = torch.cuda.is_available() and probe.model.device != "cpu"
    if cuda:
        modes[GRAPH_MODE[0]] = GRAPH_MODE[1]
    if args.modes:
        unknown = set(args.modes) - set(modes)
        if unknown:
            raise SystemExit(f"unknown mode(s) {sorted(unknown)}; available here: {', '.join(modes)}")
        modes = {m: modes[m] for m in args.modes}

    trainers, configs = {}, {}
    for mode, extra in modes.items():
        # the run directory beside the results unless an override names one
        cfg = load_config(None, [f"logging.output_dir={Path(args.results).parent / 'runs'}", *base, *extra])
        trainer = Trainer(cfg)
        trainer.reward = CountingReward(trainer.reward)
        if trainer.evaluator is not None:
            trainer.evaluator = None
        trainers[mode], configs[mode] = trainer, " ".join([*args.overrides, *extra])
    any_trainer = next(iter(trainers.values()))
    device, dtype = any_trainer.device, any_trainer.model.dtype
    beta = any_trainer.cfg.dag.beta
    env = harness.environment(device)
    run_id = uuid.uuid4().hex[:8]
    matmul = harness.measure_matmul_tflops(device, dtype)
    print(f"[benchmarks] {args.preset}: {preset['doc']}")
    print(f"[benchmarks] {env['hardware']} | torch {env['torch_version']} | git {env['git_revision']} | "
          f"matmul {matmul:.3g} TFLOP/s ({str(dtype).replace('torch.', '')}) | run {run_id}")

    stats: dict[str, dict[str, Any]] = {m: {"rollout": [], "update": [], "peak": 0.0} for m in modes}
    first_rewards, images_scored, flops_of = {}, {}, {}
    for epoch in range(args.epochs + 1):
        for mode, trainer in trainers.items():
            if device.type == "cuda":
                torch.cuda.empty_cache()
            reset_peak_memory(device)
            before = trainer.reward.images
            if epoch == 0 and args.flops_in_warmup and not args.no_flops and not trainer.cfg.sample.cuda_graphs:
                flops_of[mode], (r_s, u_s, trajs) = counted_epoch(trainer, beta)
            else:
                r_s, u_s, trajs = _epoch(trainer, beta)
            if on_epoch is not None:
                on_epoch(mode, epoch, r_s, u_s)
            stats[mode]["peak"] = max(stats[mode]["peak"], peak_memory_mib(device))
            if epoch == 0:  # same seeds: the first epoch's samples (and rewards) must agree between modes
                first_rewards[mode] = trajs.rewards.float().cpu()
                images_scored[mode] = trainer.reward.images - before
            else:
                stats[mode]["rollout"].append(r_s)
                stats[mode]["update"].append(u_s)
    telemetry = nvml_telemetry(device)

    summary: dict[str, dict[str, float]] = {}
    rows: list[dict[str, Any]] = []

    def add(mode: str, metric: str, value: float, unit: str) -> None:
        rows.append({**env, "run_id": run_id, "benchmark": "throughput", "preset": args.preset, "mode": mode,
                     "config": configs.get(mode, " ".join(args.overrides)), "metric": metric,
                     "value": f"{value:.6g}", "unit": unit})
        summary.setdefault(mode, {})[metric] = value
        if on_row is not None:
            on_row(rows[-1])

    add("device", "matmul_tflops", matmul, "TFLOP/s")
    for key, value in telemetry.items():
        add("device", key, value, key.rsplit("_", 1)[-1])
    for mode, trainer in trainers.items():
        cfg = trainer.cfg
        n = cfg.trajectories_per_epoch
        transitions = n * trainer.num_train_steps * cfg.train.num_inner_epochs
        rollout_s = statistics.median(stats[mode]["rollout"])
        update_s = statistics.median(stats[mode]["update"])
        epochs = [r + u for r, u in zip(stats[mode]["rollout"], stats[mode]["update"])]
        epoch_s = statistics.median(epochs)
        add(mode, "epoch_seconds", epoch_s, "s")
        add(mode, "epoch_seconds_min", min(epochs), "s")
        add(mode, "epoch_seconds_max", max(epochs), "s")
        add(mode, "rollout_seconds", rollout_s, "s")
        add(mode, "update_seconds", update_s, "s")
        add(mode, "rollout_traj_per_s", n / rollout_s, "traj/s")
        add(mode, "update_transitions_per_s", transitions / update_s, "transitions/s")
        add(mode, "peak_memory_mib", stats[mode]["peak"], "MiB")
        add(mode, "images_scored_per_epoch", images_scored[mode], "images")
        add(mode, "first_epoch_reward_mean", first_rewards[mode].mean().item(), "reward")
        if not args.no_flops:
            flops = flops_of[mode] if mode in flops_of else count_epoch_flops(trainer, beta)
            add(mode, "flops_per_epoch", flops, "FLOP")
            add(mode, "mfu", flops / (epoch_s * matmul * 1e12), "fraction")
        if not args.no_profile:  # one profiled epoch: the phase breakdown (device synchronised at phase boundaries)
            trainer.timer = PhaseTimer(enabled=True, device=device)
            _epoch(trainer, beta)
            for stage, phases in trainer.timer.seconds().items():
                for phase, seconds in phases.items():
                    add(mode, f"phase_s.{stage}.{phase}", seconds, "s")
            trainer.timer = PhaseTimer(enabled=False, device=device)

    ref = trainers.get("fastdag", any_trainer)
    b, T = ref.cfg.sample.batch_size, ref.sampler.num_steps
    unet_s = unet_only_seconds(ref, b, warmup=2, repeat=args.repeat)
    add("fastdag", "unet_only_traj_per_s", b / (unet_s * T), "traj/s")
    for mode in summary:
        if "rollout_traj_per_s" in summary[mode]:
            add(mode, "rollout_over_unet_only", summary[mode]["rollout_traj_per_s"] / (b / (unet_s * T)), "ratio")
    if "fastdag" in summary and "official" in summary:
        add("official", "official_over_fastdag_epoch", summary["official"]["epoch_seconds"]
            / summary["fastdag"]["epoch_seconds"], "ratio")
        diff = (first_rewards["official"] - first_rewards["fastdag"]).abs().max().item()
        add("official", "first_epoch_reward_max_abs_diff", diff, "reward")
        if sampled_alike(trainers["official"], trainers["fastdag"]):
            same = bool(torch.equal(first_rewards["official"], first_rewards["fastdag"]))
            add("official", "same_first_epoch_rewards", float(same), "bool")
        else:  # like with like only: the modes sample with different step implementations here
            print("[benchmarks] same_first_epoch_rewards not recorded: the modes sample with different DDIM-step "
                  f"implementations here (max |reward difference| {diff:.3g})")

    graph_batches = preset["graph_batches"] if args.graph_batches is None else args.graph_batches
    if graph_batches and device.type == "cuda":
        graph_sweep(ref, graph_batches, args.repeat, add)
    elif graph_batches:
        print("[benchmarks] skipping the CUDA-graph sweep: CUDA graphs need a GPU (the rollout runs eager here)")

    path = harness.append_rows(args.results, rows, THROUGHPUT_FIELDS)
    _print_summary(summary, args.epochs)
    print(f"[benchmarks] appended {len(rows)} rows to {path} (run {run_id})")
    if args.chart or args.summary:
        from fastdag.bench import report

        if args.chart:
            print(f"[benchmarks] chart: {report.chart(args.results, args.chart, run_id=run_id)}")
        if args.summary:
            print(f"[benchmarks] summary: {report.summary(args.results, args.summary, run_id=run_id)}")
    trainers.clear()  # free the models before the caller goes on (two to three copies of the model)
    gc.collect()
    summary["run"] = {"run_id": run_id}  # type: ignore[dict-item]
    return summary


def _print_summary(summary: dict[str, dict[str, float]], epochs: int) -> None:
    keys = [("epoch_seconds", "epoch s", "{:.3f}"), ("rollout_traj_per_s", "rollout traj/s", "{:.3g}"),
            ("update_transitions_per_s", "update trans/s", "{:.3g}"), ("peak_memory_mib", "peak MiB", "{:.0f}"),
            ("images_scored_per_epoch", "images scored", "{:.0f}"), ("mfu", "MFU", "{:.2%}")]
    print(f"{'mode':<16}" + "".join(f"{label:>16}" for _, label, _ in keys) + f"   (median of {epochs} epochs)")
    for mode, values in summary.items():
        if "epoch_seconds" not in values:
            continue
        print(f"{mode:<16}" + "".join(f"{fmt.format(values[k]) if k in values else '-':>16}" for k, _, fmt in keys))
    if "official" in summary and "official_over_fastdag_epoch" in summary["official"]:
        o = summary["official"]
        same = (f"same first-epoch rewards: {bool(o['same_first_epoch_rewards'])}" if "same_first_epoch_rewards" in o
                else "first-epoch rewards not comparable (different DDIM-step implementations)")
        print(f"official / fastdag epoch time = {o['official_over_fastdag_epoch']:.2f}x; {same}")
    if "fastdag" in summary and "rollout_over_unet_only" in summary["fastdag"]:
        print(f"fastdag rollout / UNet-only forward throughput = {summary['fastdag']['rollout_over_unet_only']:.1%}")


def main(argv: Optional[Sequence[str]] = None) -> dict[str, dict[str, float]]:
    return run(argv)


if __name__ == "__main__":
    main()
