"""Evaluation on held-out prompts (reward and an optional metric), and the run's at-a-glance report.

A metric may also summarise a whole sample set (a `summary(images, prompts) -> dict` method, as the shapes
world's judge does: taste rate, stated-attribute accuracy, realism, the distributions of unstated attributes);
the report then shows those figures before and after, draws the distributions as bar charts, and writes them
to `evaluation.json` beside it.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from fastdag.config import Config, PromptsConfig
from fastdag.families import Cond, ModelFamily
from fastdag.outputs import sample_grid
from fastdag.prompts import load_prompts
from fastdag.rewards import CheckedReward, build_metric
from fastdag.rollout import generate_images


@dataclass
class Evaluation:
    """Means over every (prompt, sample) of the reward and the metric's entries, plus the images."""

    scores: dict[str, float]
    prompts: list[str]  # N = prompts x samples_per_prompt, prompt-major
    images: torch.Tensor  # [N, 3, H, W] in [0, 1]
    summary: Optional[dict] = None  # the metric's figures of the whole set, JSON-able (metrics with `summary`)


class Evaluator:
    def __init__(self, cfg: Config, model: ModelFamily, reward: CheckedReward, uncond: Optional[Cond]):
        e = cfg.eval
        self.cfg, self.model, self.reward, self.uncond = cfg, model, reward, uncond
        prompts = load_prompts(PromptsConfig(source=e.prompts, column=cfg.prompts.column))
        self.prompts = [p for p in prompts for _ in range(e.samples_per_prompt)]
        self.metric = build_metric(e.metric, e.metric_kwargs) if e.metric else None
        # the family's sampler with evaluation's steps and stochasticity (eval.eta: DDIM's η or the flow noise level)
        self.sampler = model.make_sampler(e.num_steps or cfg.sample.num_steps, cfg.sample, backend=cfg.kernels.backend,
                                          stochasticity=e.eta)

    def __call__(self) -> Evaluation:
        e, s = self.cfg.eval, self.cfg.sample
        generator = torch.Generator(self.model.device).manual_seed(e.seed)  # same noise for every evaluation
        was_training = self.model.denoiser.training
        self.model.denoiser.eval()
        images = torch.cat([
            generate_images(
                self.model, self.sampler, self.prompts[i : i + s.batch_size],
                guidance_scale=s.guidance_scale if e.guidance_scale is None else e.guidance_scale,
                uncond=self.uncond, generator=generator,
            )
            for i in range(0, len(self.prompts), s.batch_size)
        ])
        self.model.denoiser.train(was_training)
        scores = {"reward": self.reward(images, self.prompts).mean().item()}
        if self.metric is not None:
            # nanmean: a metric marks with NaN what it cannot score on an image (an attribute its prompt leaves out).
            scores.update({k: v.float().nanmean().item() for k, v in self.metric(images, self.prompts).items()})
        summary = self.metric.summary(images, self.prompts) if hasattr(self.metric, "summary") else None
        return Evaluation(scores, self.prompts, images, summary)

    def grid(self, evaluation: Evaluation):
        """The first sample of each of the first ``eval.grid_prompts`` prompts, captioned."""
        k, n = self.cfg.eval.samples_per_prompt, self.cfg.eval.grid_prompts
        idx = list(range(0, len(evaluation.prompts), k))[:n]
        return sample_grid(evaluation.images[idx], [evaluation.prompts[i] for i in idx])


def trailing_mean(values: list[float], window: int) -> list[float]:
    """values[i] averaged with up to window − 1 predecessors."""
    return [sum(values[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def _summary_lines(before: dict, after: dict) -> list[str]:
    """Markdown rows of a metric summary's headline figures (taste rate, realism, Fréchet distance to true renders,
    stated accuracy, entropies)."""
    rows: list[tuple[str, Optional[float], Optional[float]]] = []
    for key in ("taste_rate", "realism", "realism_rate", "frechet_distance"):
        if key in before:
            rows.append((key, before[key], after.get(key)))
    for name, value in before.get("stated_accuracy", {}).items():
        rows.append((f"stated {name} accuracy", value, after.get("stated_accuracy", {}).get(name)))
    for name, figures in before.get("unstated", {}).items():
        rows.append((f"unstated {name}: normalised entropy", figures["normalised_entropy"],
                     after.get("unstated", {}).get(name, {}).get("normalised_entropy")))
    lines = ["| figure | base model | after training | change |", "| --- | --- | --- | --- |"]
    for name, b, a in rows:
        if b is None or a is None:
            continue
        lines.append(f"| {name} | {b:.4g} | {a:.4g} | {a - b:+.4g} |")
    return lines


def plot_unstated(before: dict, after: dict, path: Path) -> bool:
    """Bar charts, one per unstated attribute, of its values' shares before and after; False if none."""
    names = [n for n in before.get("unstated", {}) if n in after.get("unstated", {})]
    if not names:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.0), squeeze=False)
    for ax, name in zip(axes[0], names):
        values = list(before["unstated"][name]["counts"])
        for offset, (label, summary) in zip((-0.2, 0.2), (("base model", before), ("after training", after))):
            counts = summary["unstated"][name]["counts"]
            total = max(1, sum(counts.values()))
            ax.bar([i + offset for i in range(len(values))], [counts[v] / total for v in values], width=0.4,
                   label=label)
        ax.set_xticks(range(len(values)), values, rotation=45, ha="right")
        ax.set_title(f"unstated {name}")
        ax.set_ylabel("share of shapes seen" if name != "background" else "share of samples")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(run_dir: Path, rows: list[dict], before: Optional[Evaluation], after: Optional[Evaluation],
                 evaluator: Optional[Evaluator], title: str) -> Path:
    """``report.md`` beside a reward-curve PNG and before/after grids: the run at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    mean = [r["reward_mean"] for r in rows]
    std = [r["reward_std"] for r in rows]
    ax.plot(epochs, mean, marker="o", label="reward mean")
    ax.fill_between(epochs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2, label="± std")
    # Each epoch's mean is over a few dozen samples of different prompts: a trailing average shows the trend.
    window = max(1, len(mean) // 8)
    if window > 1:
        ax.plot(epochs, trailing_mean(mean, window), color="black", label=f"mean of the last {window} epochs")
    ax.set_xlabel("epoch")
    ax.set_ylabel("reward of the epoch's samples")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "reward_curve.png", dpi=120)
    plt.close(fig)

    lines = [f"# {title}", "", f"Run directory: `{run_dir}`", "", "## Reward per epoch", "", "![reward per epoch](reward_curve.png)", ""]
    lines += ["| epoch | reward mean | reward std | β | loss | rollout s | update s |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['epoch']} | {r['reward_mean']:.4g} | {r['reward_std']:.3g} | {r['beta']:.4g} | "
                     f"{r.get('loss', float('nan')):.4g} | {r['rollout_seconds']:.1f} | {r['update_seconds']:.1f} |")
    if before is not None and after is not None and evaluator is not None:
        e = evaluator.cfg.eval
        lines += ["", f"## Held-out evaluation ({len(set(before.prompts))} prompts `{e.prompts}`, "
                  f"{e.samples_per_prompt} samples each, same seeds before and after)", "",
                  "| score | base model | after training | change |", "| --- | --- | --- | --- |"]
        for k in before.scores:
            b, a = before.scores[k], after.scores[k]
            if math.isnan(b) and math.isnan(a):
                continue  # a metric entry that no prompt of the set states
            lines.append(f"| {k} | {b:.4g} | {a:.4g} | {a - b:+.4g} |")
        if before.summary is not None and after.summary is not None:
            (run_dir / "evaluation.json").write_text(
                json.dumps({"before": {"scores": before.scores, **before.summary},
                            "after": {"scores": after.scores, **after.summary}}, indent=2) + "\n"
            )
            lines += ["", f"### Figures of the `{e.metric}` metric (all numbers in `evaluation.json`)", ""]
            lines += _summary_lines(before.summary, after.summary)
            if plot_unstated(before.summary, after.summary, run_dir / "unstated_attributes.png"):
                lines += ["", "Attributes the prompts leave out, as the metric sees them:", "",
                          "![unstated attributes](unstated_attributes.png)"]
        evaluator.grid(before).save(run_dir / "samples_before.png")
        evaluator.grid(after).save(run_dir / "samples_after.png")
        lines += ["", "## Samples: base model (left) and after training (right), same prompts and seeds", "",
                  "| before | after |", "| --- | --- |", "| ![before](samples_before.png) | ![after](samples_after.png) |"]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
