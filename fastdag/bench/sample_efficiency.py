"""``fastdag bench sample-efficiency``: algorithms compared at equal trajectory budgets.

    fastdag bench sample-efficiency --config configs/shapes_aesthetic.yaml \\
        --algorithms db kl ddpo grpo --seeds 0 1 2 --trajectories 3072 --evals 4 \\
        --set grpo:sample.group_size=4 --set ddpo:train.learning_rate=1e-3

For each algorithm and seed, one run of the config with the same trajectory budget (``--trajectories``, rounded to
whole epochs) and a checkpoint at every 1/``--evals`` of it; each checkpoint (and the base model, once per seed) is
then evaluated afresh on the held-out prompts (``fastdag evaluate``: reward, the task's metric and, for the shapes
world, the judge's figures). Rows go to ``docs/results/bench/sample_efficiency.csv`` (long format: one metric per
row, with the git revision and hardware); the chart (reward vs trajectories, mean and spread over seeds) and the
Markdown summary (the figures at each budget) are drawn from that CSV only (``--report-only`` redraws them).
``--set ALGO:key=value`` gives one algorithm its own settings (a learning rate from a sweep, GRPO's group size).
"""
from __future__ import annotations

import argparse
import csv
import math
import statistics
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional, Sequence

from fastdag.bench import harness

RESULTS = harness.RESULTS_DIR / "sample_efficiency.csv"
FIELDS = ("timestamp", "git_revision", "hardware", "run_id", "task", "algorithm", "seed", "trajectories", "kind",
          "metric", "value")


def flatten(prefix: str, value: Any) -> dict[str, float]:
    """Numbers of a nested evaluation summary as dotted keys (lists and strings are left out)."""
    if isinstance(value, dict):
        out: dict[str, float] = {}
        for k, v in value.items():
            out.update(flatten(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return {prefix: float(value)}
    return {}


def parse_sets(items: Sequence[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for item in items:
        algorithm, _, override = item.partition(":")
        if not override or "=" not in override:
            raise SystemExit(f"--set {item!r}: expected ALGO:key=value, e.g. grpo:sample.group_size=4")
        out[algorithm].append(override)
    return out


def parse_algorithms(items: Sequence[str]) -> dict[str, str]:
    """``--algorithms`` entries: ALGO, or LABEL=ALGO for a variant of one (``kl-pooled=kl`` with
    ``--set kl-pooled:dag.rloo_normaliser=pooled``). label -> dag.algorithm."""
    out = {}
    for item in items:
        label, _, algorithm = item.partition("=")
        out[label] = algorithm or label
    return out


def run_one(config: str, algorithm: str, seed: int, overrides: list[str], budget: int, evals: int,
            out_dir: Path, label: Optional[str] = None) -> tuple[list[dict[str, Any]], float, int, list[tuple[int, Path]]]:
    """Train one (algorithm, seed): (metrics rows, wall seconds, trajectories per epoch,
    [(trajectories so far, checkpoint)])."""
    from fastdag.config import load_config
    from fastdag.trainer import Trainer

    probe = load_config(config, [*overrides, f"dag.algorithm={algorithm}"])
    per_epoch = probe.trajectories_per_epoch
    epochs = max(evals, round(budget / per_epoch))
    every = max(1, epochs // evals)
    name = f"{label or algorithm}-seed{seed}"
    cfg = load_config(config, [*overrides, f"dag.algorithm={algorithm}", f"train.seed={seed}",
                               f"train.epochs={epochs}", f"checkpoint.every_n_epochs={every}",
                               "checkpoint.keep_last=0", "eval.prompts=null", "logging.progress=false",
                               f"logging.output_dir={out_dir}", f"logging.run_name={name}"])
    t0 = time.perf_counter()
    rows = Trainer(cfg).fit()
    seconds = time.perf_counter() - t0
    checkpoints = sorted((out_dir / name / "checkpoints").glob("epoch-*"))
    return rows, seconds, per_epoch, [(int(c.name.split("-")[1]) * per_epoch, c) for c in checkpoints]


def run(args: argparse.Namespace) -> str:
    from fastdag.config import load_config
    from fastdag.evaluate import evaluate

    sets = parse_sets(args.set)
    eval_prompts = args.eval_prompts or load_config(args.config, args.overrides).eval.prompts
    if not eval_prompts and not args.no_eval:
        raise SystemExit(f"{args.config} names no eval.prompts: give --eval-prompts, or --no-eval")
    out_dir = Path(args.runs)
    env = harness.environment("cpu")
    run_id = args.run_id or uuid.uuid4().hex[:8]
    task = Path(args.config).stem
    rows: list[dict[str, Any]] = []

    def add(algorithm: str, seed: int, trajectories: int, kind: str, metrics: dict[str, float]) -> None:
        rows.extend({"timestamp": env["timestamp"], "git_revision": env["git_revision"], "hardware": env["hardware"],
                     "run_id": run_id, "task": task, "algorithm": algorithm, "seed": seed,
                     "trajectories": trajectories, "kind": kind, "metric": k, "value": f"{v:.6g}"}
                    for k, v in metrics.items())

    eval_overrides = [f"eval.prompts={eval_prompts}"]
    labels = parse_algorithms(args.algorithms)
    for seed in args.seeds:
        for algorithm, dag_algorithm in labels.items():
            overrides = [*args.overrides, *sets.get(algorithm, [])]
            metrics_rows, seconds, per_epoch, checkpoints = run_one(args.config, dag_algorithm, seed, overrides,
                                                                    args.trajectories, args.evals, out_dir, algorithm)
            for r in metrics_rows:
                add(algorithm, seed, r["epoch"] * per_epoch, "train", {"reward_mean": r["reward_mean"]})
            add(algorithm, seed, metrics_rows[-1]["epoch"] * per_epoch, "wall", {"seconds": seconds})
            if not args.no_eval:
                if algorithm == next(iter(labels)):  # the base model, once per seed: every algorithm starts there
                    base = evaluate(str(checkpoints[0][1]), eval_overrides, base=True)
                    for a in labels:
                        add(a, seed, 0, "eval", {**base["scores"], **flatten("", base["summary"] or {})})
                for trajectories, checkpoint in checkpoints:
                    res = evaluate(str(checkpoint), eval_overrides)
                    add(algorithm, seed, trajectories, "eval", {**res["scores"], **flatten("", res["summary"] or {})})
            print(f"[sample-efficiency] {algorithm} seed {seed}: {len(metrics_rows)} epochs, {seconds:.0f} s", flush=True)
    harness.append_rows(args.results, rows, FIELDS)
    return run_id


def read(path: Path, run_id: Optional[str] = None) -> list[dict[str, Any]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    run_id = run_id or rows[-1]["run_id"]
    return [r for r in rows if r["run_id"] == run_id]


def series(rows: list[dict[str, Any]], kind: str, metric: str) -> dict[str, dict[int, list[float]]]:
    """algorithm -> trajectories -> values over seeds."""
    out: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["kind"] == kind and r["metric"] == metric:
            out[r["algorithm"]][int(r["trajectories"])].append(float(r["value"]))
    return out


def chart(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for algorithm, points in series(rows, "train", "reward_mean").items():
        xs = sorted(points)
        mean = [statistics.fmean(points[x]) for x in xs]
        lo = [min(points[x]) for x in xs]
        hi = [max(points[x]) for x in xs]
        ax.plot(xs, mean, label=f"{algorithm} (mean of {len(points[xs[0]])} seeds)")
        ax.fill_between(xs, lo, hi, alpha=0.2)
    ax.set_xlabel("trajectories sampled")
    ax.set_ylabel("training reward (epoch mean)")
    ax.set_title(f"{rows[0]['task']}: reward per trajectory (band: min-max over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


CURVES = (("taste_rate", "taste rate"), ("stated_accuracy.all", "stated-attribute accuracy"), ("realism", "realism"),
          ("frechet_distance", "Fréchet distance to true renders"),
          ("unstated.background.normalised_entropy", "background entropy (unstated)"), ("reward", "held-out reward"))


def eval_chart(rows: list[dict[str, Any]], path: Path, curves: Sequence[tuple[str, str]] = CURVES) -> Optional[Path]:
    """One panel per evaluation figure against trajectories: each algorithm's mean over seeds, band min-max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [(m, title) for m, title in curves if series(rows, "eval", m)]
    if not present:
        return None
    cols = 3
    fig, axes = plt.subplots((len(present) + cols - 1) // cols, cols, figsize=(4 * cols, 3 * ((len(present) + 2) // 3)),
                             squeeze=False)
    for ax, (metric, title) in zip(axes.flat, present):
        for algorithm, points in sorted(series(rows, "eval", metric).items()):
            xs = sorted(points)
            ax.plot(xs, [statistics.fmean(points[x]) for x in xs], marker="o", ms=3, label=algorithm)
            ax.fill_between(xs, [min(points[x]) for x in xs], [max(points[x]) for x in xs], alpha=0.15)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("trajectories", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(present):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{rows[0]['task']}: held-out figures by the judge (mean over seeds, band min-max)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary(rows: list[dict[str, Any]], path: Path, headline: Sequence[str], reach: str = "reward") -> Path:
    """Markdown: the evaluation figures of each algorithm at each budget (mean ± spread over seeds) and wall time."""
    evals = [r for r in rows if r["kind"] == "eval"]
    metrics = [m for m in headline if any(r["metric"] == m for r in evals)]
    lines = [f"# Sample efficiency: {rows[0]['task']}", "",
             f"run {rows[0]['run_id']}, git {rows[0]['git_revision']}, {rows[0]['hardware']}, {rows[0]['timestamp']}",
             "", "| algorithm | trajectories | " + " | ".join(metrics) + " |",
             "|---|---:|" + "---:|" * len(metrics)]
    table: dict[tuple[str, int], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in evals:
        table[(r["algorithm"], int(r["trajectories"]))][r["metric"]].append(float(r["value"]))
    for (algorithm, trajectories), values in sorted(table.items()):
        cells = []
        for m in metrics:
            v = values.get(m, [])
            cells.append(f"{statistics.fmean(v):.4g} ± {statistics.pstdev(v):.2g}" if v else "")
        lines.append(f"| {algorithm} | {trajectories} | " + " | ".join(cells) + " |")
    lines += reach_lines(rows, reach) + hacking_lines(rows)
    walls = series(rows, "wall", "seconds")
    lines += ["", "| algorithm | wall seconds per run (mean over seeds) |", "|---|---:|"]
    lines += [f"| {a} | {statistics.fmean(v for vs in p.values() for v in vs):.0f} |" for a, p in walls.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _eval_means(rows: list[dict[str, Any]], metric: str) -> dict[str, dict[int, float]]:
    """algorithm -> trajectories -> the metric's mean over seeds, from the evaluation rows."""
    return {a: {t: statistics.fmean(v) for t, v in points.items()} for a, points in series(rows, "eval", metric).items()}


def reach_lines(rows: list[dict[str, Any]], metric: str = "reward") -> list[str]:
    """Markdown: for each pair of algorithms, the trajectories the first needed (at the evaluated budgets, mean
    over seeds) to reach the second's final `metric` (an evaluation figure, higher is better)."""
    means = _eval_means(rows, metric)
    if len(means) < 2:
        return []
    final = {a: points[max(points)] for a, points in means.items()}
    algorithms = sorted(means)
    lines = ["", f"Trajectories each algorithm (row) needed to reach another's (column) final {metric} "
             "(mean over seeds, at the evaluated budgets; — never):", "",
             "| needs → to reach | " + " | ".join(f"{b} ({final[b]:.3g})" for b in algorithms) + " |",
             "|---|" + "---:|" * len(algorithms)]
    for a in algorithms:
        cells = []
        for b in algorithms:
            hit = [t for t, v in sorted(means[a].items()) if v >= final[b]]
            cells.append(str(hit[0]) if hit else "—")
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return lines


def hacking_lines(rows: list[dict[str, Any]], realism_drop: float = 0.03) -> list[str]:
    """Markdown: per algorithm, the training reward's rise (mean of the last 5 epochs minus the first 5) and the
    judge's realism from the base model to the final checkpoint (means over seeds); "hacked" when the reward
    rose while realism fell by more than `realism_drop` (3 points, the main job's bar)."""
    realism = _eval_means(rows, "realism")
    if not realism:
        return []
    lines = ["", "| algorithm | training reward: first 5 → last 5 epochs | judge realism: base → final | hacked? |",
             "|---|---|---|---|"]
    for algorithm, points in sorted(series(rows, "train", "reward_mean").items()):
        curve = [statistics.fmean(points[t]) for t in sorted(points)]
        first, last = statistics.fmean(curve[:5]), statistics.fmean(curve[-5:])
        r = realism.get(algorithm, {})
        if not r:
            continue
        base, end = r[min(r)], r[max(r)]
        hacked = last > first and end < base - realism_drop
        lines.append(f"| {algorithm} | {first:.3g} → {last:.3g} | {base:.3f} → {end:.3f} | {'yes' if hacked else 'no'} |")
    return lines


HEADLINE = ("reward", "taste_rate", "realism", "stated_accuracy.all", "frechet_distance",
            "unstated.size.normalised_entropy", "unstated.position.normalised_entropy",
            "unstated.background.normalised_entropy", "shapes_accuracy")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="fastdag bench sample-efficiency", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="the task's config (its eval.prompts and eval.metric are used)")
    p.add_argument("--algorithms", nargs="+", default=["db", "kl", "ddpo", "grpo"],
                   help="dag.algorithm values, or LABEL=ALGO for a variant (with --set LABEL:key=value)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--trajectories", type=int, default=2048, help="trajectory budget per run (whole epochs)")
    p.add_argument("--evals", type=int, default=4, help="evaluations per run, evenly over the budget")
    p.add_argument("--set", action="append", default=[], metavar="ALGO:key=value", help="an algorithm's own setting")
    p.add_argument("--eval-prompts", default=None, help="held-out prompts (default: the config's eval.prompts)")
    p.add_argument("--no-eval", action="store_true", help="training curves only")
    p.add_argument("--runs", default=str(harness.RESULTS_DIR / "runs" / "sample_efficiency"), help="run directories")
    p.add_argument("--results", default=str(RESULTS), help="CSV the rows are appended to")
    p.add_argument("--chart", default=str(harness.RESULTS_DIR / "sample_efficiency.png"))
    p.add_argument("--summary", default=str(harness.RESULTS_DIR / "sample_efficiency.md"))
    p.add_argument("--reach", default="reward", help="the evaluation figure of the 'trajectories to reach' table "
                   "(e.g. taste_rate on shapes_aesthetic)")
    p.add_argument("--report-only", action="store_true", help="redraw chart and summary from the CSV's last run")
    p.add_argument("--run-id", default=None, help="tag the rows with this id (default: a new one), so that "
                   "invocations run side by side (e.g. one per seed) form one study; with --report-only: draw it")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    args = p.parse_intermixed_args(argv)
    run_id = args.run_id if args.report_only else run(args)
    rows = read(Path(args.results), run_id)
    curves = eval_chart(rows, Path(args.chart).with_name(Path(args.chart).stem + "_eval.png"))
    print(f"chart: {chart(rows, Path(args.chart))}\ncurves: {curves}\n"
          f"summary: {summary(rows, Path(args.summary), HEADLINE, args.reach)}")
    return 0
