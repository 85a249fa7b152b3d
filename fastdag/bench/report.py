"""Charts and Markdown summaries of the throughput suite, drawn from its results file only.

    fastdag bench report                                   # latest run of each preset
    fastdag bench report --results R.csv --chart C.png --summary S.md --run-id abc123

The chart stacks each mode's rollout and update phases (seconds per epoch, from the profiled epoch); the summary
tabulates rates, memory, MFU and the official / fastdag ratio per preset, with the machine and revision.
"""
from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence, Union

from fastdag.bench.throughput import DEFAULT_RESULTS

PathLike = Union[str, Path]


def read_rows(results: PathLike) -> list[dict[str, str]]:
    with open(results, newline="") as f:
        return list(csv.DictReader(f))


def select_runs(rows: list[dict[str, str]], run_id: Optional[str] = None) -> dict[str, list[dict[str, str]]]:
    """{preset: rows of one run}: ``run_id``'s rows, or the latest run (by timestamp, then file order) per preset."""
    if run_id is not None:
        chosen = [r for r in rows if r["run_id"] == run_id]
        if not chosen:
            raise ValueError(f"no rows with run_id {run_id!r}")
        by_preset: dict[str, list[dict[str, str]]] = defaultdict(list)
        for r in chosen:
            by_preset[r["preset"]].append(r)
        return dict(by_preset)
    latest: dict[str, str] = {}
    for r in rows:  # file order is append order: the last run seen per preset is the latest
        latest[r["preset"]] = r["run_id"]
    return {p: [r for r in rows if r["run_id"] == rid] for p, rid in latest.items()}


def _metrics(rows: list[dict[str, str]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for r in rows:
        out[r["mode"]][r["metric"]] = float(r["value"])
    return out


def phase_breakdowns(rows: list[dict[str, str]]) -> dict[str, dict[str, dict[str, float]]]:
    """{mode: {stage: {phase: seconds}}} from the ``phase_s.<stage>.<phase>`` rows."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for mode, metrics in _metrics(rows).items():
        for key, value in metrics.items():
            if key.startswith("phase_s."):
                _, stage, phase = key.split(".", 2)
                out.setdefault(mode, {}).setdefault(stage, {})[phase] = value
    return out


def chart(results: PathLike, path: PathLike, run_id: Optional[str] = None) -> Path:
    """Stacked rollout-vs-update phase bars for every mode of the selected run(s) (PNG, matplotlib Agg)."""
    from fastdag.profiling import plot_breakdown

    runs = select_runs(read_rows(results), run_id)
    bars = {}
    for preset, rows in runs.items():
        for mode, breakdown in phase_breakdowns(rows).items():
            bars[f"{preset}/{mode}" if len(runs) > 1 else mode] = breakdown
    if not bars:
        raise ValueError(f"{results}: no phase rows to chart")
    first = next(iter(runs.values()))[0]
    title = f"seconds per epoch by phase — {', '.join(runs)} on {first['hardware']}"
    return plot_breakdown(bars, path, title=title)


SUMMARY_METRICS = (
    ("epoch_seconds", "epoch s", "{:.3f}"),
    ("rollout_traj_per_s", "rollout traj/s", "{:.3g}"),
    ("update_transitions_per_s", "update transitions/s", "{:.3g}"),
    ("rollout_over_unet_only", "rollout / UNet-only", "{:.1%}"),
    ("peak_memory_mib", "peak memory MiB", "{:.0f}"),
    ("images_scored_per_epoch", "images scored", "{:.0f}"),
    ("mfu", "MFU", "{:.2%}"),
)


def summary(results: PathLike, path: Optional[PathLike] = None, run_id: Optional[str] = None) -> Union[Path, str]:
    """A Markdown summary of the selected run(s); written to ``path`` (returned) or returned as text."""
    lines = ["# fastdag throughput", ""]
    for preset, rows in select_runs(read_rows(results), run_id).items():
        metrics = _metrics(rows)
        r0 = rows[0]
        lines += [f"## {preset}", "",
                  f"{r0['hardware']} · torch {r0['torch_version']} · triton {r0['triton_version']} · "
                  f"git {r0['git_revision']} · {r0['timestamp']} · run {r0['run_id']}", ""]
        modes = [m for m in metrics if "epoch_seconds" in metrics[m]]
        lines += ["| mode | " + " | ".join(label for _, label, _ in SUMMARY_METRICS) + " |",
                  "|---|" + "---|" * len(SUMMARY_METRICS)]
        for m in modes:
            cells = [fmt.format(metrics[m][k]) if k in metrics[m] else "–" for k, _, fmt in SUMMARY_METRICS]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
        off = metrics.get("official", {})
        if "official_over_fastdag_epoch" in off:
            if "same_first_epoch_rewards" in off:
                same = f"same first-epoch rewards: {'yes' if off['same_first_epoch_rewards'] else 'no'}"
            else:  # recorded only where both modes sample with the same DDIM-step implementation
                same = "first-epoch rewards sampled by different DDIM-step implementations"
                if "first_epoch_reward_max_abs_diff" in off:
                    same += f", max difference {off['first_epoch_reward_max_abs_diff']:.3g}"
            ratio = off["official_over_fastdag_epoch"]
            lines.append(f"- official-cost / fastdag epoch time: **{ratio:.2f}×** ({same})")
        dev = metrics.get("device", {})
        if "matmul_tflops" in dev:
            lines.append(f"- measured matmul rate (MFU denominator): {dev['matmul_tflops']:.3g} TFLOP/s")
        nvml = {k: v for k, v in dev.items() if k.startswith("nvml_")}
        if nvml:
            lines.append("- NVML: " + ", ".join(f"{k[5:]} {v:.4g}" for k, v in sorted(nvml.items())))
        sweep = {}
        for mode in ("eager", "cuda_graphs"):
            for k, v in metrics.get(mode, {}).items():
                if k.startswith("denoise_traj_per_s.b"):
                    sweep.setdefault(int(k.rsplit(".b", 1)[1]), {})[mode] = v
        if sweep:
            lines += ["", "| batch | eager traj/s | CUDA graphs traj/s | speed-up |", "|---|---|---|---|"]
            for b in sorted(sweep):
                e, g = sweep[b].get("eager"), sweep[b].get("cuda_graphs")
                lines.append(f"| {b} | {e:.3g} | {g:.3g} | {g / e:.2f}× |" if e and g else f"| {b} | {e} | {g} | – |")
        breakdowns = phase_breakdowns(rows)
        if breakdowns:
            from fastdag.profiling import format_table

            lines.append("")
            for mode, breakdown in breakdowns.items():
                lines += [format_table(breakdown, title=f"{mode}: seconds per epoch by phase (profiled epoch)"), ""]
        lines.append("")
    text = "\n".join(lines)
    if path is None:
        return text
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="fastdag bench report", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=str(DEFAULT_RESULTS))
    p.add_argument("--chart", default=str(Path(DEFAULT_RESULTS).with_name("throughput.png")))
    p.add_argument("--summary", default=str(Path(DEFAULT_RESULTS).with_name("throughput.md")))
    p.add_argument("--run-id", default=None, help="one run (default: the latest run of each preset)")
    args = p.parse_args(argv)
    print(f"chart: {chart(args.results, args.chart, args.run_id)}")
    print(f"summary: {summary(args.results, args.summary, args.run_id)}")


if __name__ == "__main__":
    main()
