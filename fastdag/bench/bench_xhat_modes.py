"""Seconds per epoch with x̂_0 rewards scored once per state (``rollout``) versus the official per-transition
recompute (``recompute``), side by side in one process, on the same seeds.

    python -m fastdag.bench.bench_xhat_modes --config configs/tiny_random_compress.yaml --epochs 3

Epochs of the two modes are interleaved (A B A B ...) so drifting machine load hits both alike; the first epoch of
each is a warm-up and not counted. Rows go to ``docs/results/bench/epochs.csv``. The throughput suite
(``fastdag bench tiny|sd15``) compares the full official-cost mode (recompute, reference kernels, no CUDA
graphs) with the defaults, with phase breakdowns; this script isolates the x̂_0 lever alone.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Optional, Sequence

from fastdag.bench.harness import RESULTS_DIR, Timing, append_rows, environment, result_row
from fastdag.config import load_config
from fastdag.trainer import Trainer

MODES = ("rollout", "recompute")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/tiny_random_compress.yaml")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per mode (after one warm-up epoch)")
    p.add_argument("--results", default=str(RESULTS_DIR / "epochs.csv"))
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, dict[str, float]]:
    args = parse_args(argv)
    trainers, seconds, rewards = {}, {m: [] for m in MODES}, {m: [] for m in MODES}
    for mode in MODES:
        cfg = load_config(args.config, [*args.overrides, f"dag.xhat_rewards={mode}", "logging.progress=false",
                                        "engine.backend=torch"])
        trainers[mode] = Trainer(cfg)
    for epoch in range(args.epochs + 1):
        for mode in MODES:
            trainer = trainers[mode]
            start = time.perf_counter()
            trajs = trainer.sample_epoch()
            trainer.train_epoch(trajs, beta=cfg.dag.beta)
            if epoch > 0:
                seconds[mode].append(time.perf_counter() - start)
            rewards[mode].append(trajs.rewards.mean().item())
    env = environment(trainers["rollout"].device)
    summary, rows = {}, []
    for mode in MODES:
        s = sorted(seconds[mode])
        timing = Timing(statistics.median(s) * 1e3, s[len(s) // 5] * 1e3, s[(4 * len(s)) // 5] * 1e3, s[0] * 1e3, len(s))
        summary[mode] = {"epoch_seconds": statistics.median(s), "first_epoch_reward": rewards[mode][0]}
        rows.append(result_row(env, benchmark="epoch", provider=mode, mode="xhat_rewards", x_name="config",
                               x_value=args.config, config=" ".join(args.overrides), timing=timing))
    append_rows(args.results, rows)
    ratio = summary["recompute"]["epoch_seconds"] / summary["rollout"]["epoch_seconds"]
    print(f"[bench_xhat_modes] {env['hardware']} | {args.config} {' '.join(args.overrides)}")
    for mode in MODES:
        print(f"  {mode:<10} {summary[mode]['epoch_seconds']:8.2f} s/epoch (median of {args.epochs}); "
              f"first-epoch reward {summary[mode]['first_epoch_reward']:.5g}")
    print(f"  recompute / rollout = {ratio:.2f}x")
    summary["ratio"] = {"recompute_over_rollout": ratio}
    return summary


if __name__ == "__main__":
    main()
