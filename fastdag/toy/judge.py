"""The independent judge of the shapes world: what evaluation sees, never what a training reward sees.

A reward and the evaluation that reads the same network share its blind spots: a policy that fools the reward
fools the report. The judge is trained on the same ground truth and the same kinds of negatives as the reward's
classifier, but with another architecture (`ClassifierConfig(arch="residual")`: a 5 × 5 stem, residual
GroupNorm/SiLU blocks, another width), another seed (1 against 0) and another augmentation (`judge_augment`:
Gaussian blur, contrast and brightness jitter, noise). Only `fastdag.evaluation` loads it; no reward does.

Per image it reports what it sees (`Sighting`): each shape's kind, colour, size and position, the background,
and a realism probability, so that anyone can score a sample with it; `stated_accuracy` scores a batch against
(possibly partial) prompts.

    python -m fastdag.toy.judge          # retrains the shipped judge (~minutes at 1 thread)
"""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fastdag.toy.classifier import (
    ASSETS_DIR,
    EMPTY,
    ClassifierConfig,
    ShapesClassifier,
    load_classifier,
    train_classifier,
)
from fastdag.toy.negatives import NEGATIVE_TYPES, gaussian_blur
from fastdag.toy.reward import AESTHETIC_TASTE, Taste
from fastdag.toy.world import BACKGROUND_NAMES, COLOUR_NAMES, KINDS, POSITION_NAMES, SIZE_NAMES, parse_prompt, render

JUDGE_WEIGHTS = "shapes_judge.safetensors"
JUDGE_REPORT = "shapes_judge.json"
JUDGE_CONFIG = ClassifierConfig(arch="residual", width=16, hidden=128)
JUDGE_SEED = 1
# Attributes a prompt can state, in report order.
ATTRIBUTES: tuple[str, ...] = ("kind", "colour", "size", "position", "background")


def judge_augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The judge's own augmentation (the reward's is `classifier.augment`): for two thirds of the images a
    Gaussian blur of σ uniform in [0.3, 1.0] px (the softness of VAE decodes; the blur negatives start at 1.8),
    contrast × [0.9, 1.1] and brightness ± 0.03 per image, then Gaussian noise of σ ≤ 0.04.
    images: [B, 3, H, W] in [0, 1] -> same shape."""
    b = images.shape[0]

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(b, *shape, generator=generator)

    blur = torch.rand(b, generator=generator) < 2 / 3
    sigma = uniform(0.3, 1.0)
    images = torch.where(blur.view(-1, 1, 1, 1), gaussian_blur(images, sigma), images)
    images = (images - 0.5) * uniform(0.9, 1.1, 1, 1, 1) + 0.5 + uniform(-0.03, 0.03, 1, 1, 1)
    images = images + uniform(0.0, 0.04, 1, 1, 1) * torch.randn(images.shape, generator=generator)
    return images.clamp(0.0, 1.0)


def train_judge(out_dir: str | Path = ASSETS_DIR, seed: int = JUDGE_SEED, steps: int = 2000, **kwargs) -> dict:
    """Trains the judge (`classifier.train_classifier` with the judge's architecture, seed and augmentation, and
    the synthetic negatives only: not the hacked bank the reward's classifier learns from, so the judge's realism
    on hacked samples is an independent reading) and writes JUDGE_WEIGHTS and JUDGE_REPORT in `out_dir`.
    kwargs: other `train_classifier` settings."""
    return train_classifier(
        out_dir, seed=seed, steps=steps, config=JUDGE_CONFIG, augmentation=judge_augment,
        weights_name=JUDGE_WEIGHTS, report_name=JUDGE_REPORT, negative_types=NEGATIVE_TYPES, **kwargs,
    )


@dataclass(frozen=True)
class SeenShape:
    """A shape the judge sees: its kind, colour, size and position slot (names from fastdag.toy.world)."""

    kind: str
    colour: str
    size: str
    position: str


@dataclass(frozen=True)
class Sighting:
    """What the judge sees in one image: the shapes (in slot order), the background, p(clean render)."""

    shapes: tuple[SeenShape, ...]
    background: str
    realism: float


class Judge:
    """Loads the judge's weights (default: shipped in fastdag/assets/) and reads images."""

    def __init__(self, path: str | Path | None = None, device: torch.device | str = "cpu") -> None:
        self.model: ShapesClassifier = load_classifier(path, device, weights_name=JUDGE_WEIGHTS)

    def _input(self, images: torch.Tensor) -> torch.Tensor:
        """images float [B, 3, H, W] in [0, 1] -> the judge's input (its device, resized to its resolution)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        device = next(self.model.parameters()).device
        x = images.detach().float().clamp(0.0, 1.0).to(device)
        size = self.model.config.resolution
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return x

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The judge's penultimate activations (after the hidden layer's GELU), float32 [B, hidden] on the CPU:
        the embedding the Fréchet distance compares, as FID compares Inception's pool features."""
        x = self._input(images)
        hidden = self.model.head[:-1](self.model.features(x * 2.0 - 1.0))
        return hidden.float().cpu()

    @torch.no_grad()
    def see(self, images: torch.Tensor) -> list[Sighting]:
        """images float [B, 3, H, W] in [0, 1] (any H, W: resized to the judge's input) -> B sightings."""
        x = self._input(images)
        out = self.model(x)
        kind, colour = out.kind.argmax(-1).cpu(), out.colour.argmax(-1).cpu()  # [B, S]
        sizes, background = out.size.argmax(-1).cpu(), out.background.argmax(-1).cpu()
        realism = torch.sigmoid(out.realism.float()).cpu()
        sightings = []
        for b in range(x.shape[0]):
            shapes = tuple(
                SeenShape(KINDS[int(kind[b, s]) - 1], COLOUR_NAMES[int(colour[b, s])], SIZE_NAMES[int(sizes[b, s])],
                          POSITION_NAMES[s])
                for s in range(len(POSITION_NAMES))
                if int(kind[b, s]) != EMPTY
            )
            sightings.append(Sighting(shapes, BACKGROUND_NAMES[int(background[b])], float(realism[b])))
        return sightings


@lru_cache(maxsize=1)
def shipped_judge() -> Judge:
    return Judge()


def stated_accuracy(sightings: Sequence[Sighting], prompts: Sequence[str]) -> dict[str, list[float | None]]:
    """Per image, the fraction of each stated attribute that the judge sees as stated; None if none is stated.

    Prompts may be partial (`fastdag.toy.world.parse_prompt`). The prompt's shapes are matched one-to-one to
    the shapes seen by the assignment that agrees on the most stated attributes; a prompt shape without a
    partner gets every stated attribute wrong. Keys: ATTRIBUTES (background: stated or None), "count" (1 if the
    judge sees as many shapes as the prompt names) and "all" (every stated attribute, count included).
    """
    if len(sightings) != len(prompts):
        raise ValueError(f"{len(sightings)} sightings but {len(prompts)} prompts")
    result: dict[str, list[float | None]] = {name: [] for name in (*ATTRIBUTES, "count", "all")}
    for seen, text in zip(sightings, prompts):
        prompt = parse_prompt(text)
        best: dict[str, list[int]] = {}
        best_score = -1
        for partners in itertools.permutations(list(seen.shapes) + [None] * len(prompt.shapes), len(prompt.shapes)):
            tally: dict[str, list[int]] = {name: [0, 0] for name in ATTRIBUTES[:4]}  # [right, stated]
            for wanted, got in zip(prompt.shapes, partners):
                for name in ATTRIBUTES[:4]:
                    value = getattr(wanted, name)
                    if value is not None:
                        tally[name][1] += 1
                        tally[name][0] += int(got is not None and getattr(got, name) == value)
            score = sum(right for right, _ in tally.values())
            if score > best_score:
                best, best_score = tally, score
        for name, (right, stated) in best.items():
            result[name].append(right / stated if stated else None)
        if prompt.background is not None:
            result["background"].append(float(seen.background == prompt.background))
        else:
            result["background"].append(None)
        count = float(len(seen.shapes) == len(prompt.shapes))
        result["count"].append(count)
        right = sum(r for r, _ in best.values()) + count + (prompt.background == seen.background)
        stated = sum(n for _, n in best.values()) + 1 + (prompt.background is not None)
        result["all"].append(right / stated)
    return result


def judge_metric(
    images: torch.Tensor, prompts: Sequence[str], judge: Judge | None = None, taste: Taste = AESTHETIC_TASTE
) -> dict[str, torch.Tensor]:
    """The judge's scores per image, each float32 [B]: `judge_realism` (p(clean render)), `judge_taste` (1 if
    every shape seen has the taste's size and the background is the taste's), `judge_stated_accuracy` (the
    fraction of stated attributes seen as stated, count included) and `judge_<attribute>_accuracy` for each of
    ATTRIBUTES and count (NaN where the prompt does not state that attribute)."""
    sightings = (judge or shipped_judge()).see(images)
    accuracy = stated_accuracy(sightings, prompts)
    nan = float("nan")
    scores = {
        "judge_realism": torch.tensor([s.realism for s in sightings]),
        "judge_taste": torch.tensor([float(taste.met([x.size for x in s.shapes], s.background)) for s in sightings]),
        "judge_stated_accuracy": torch.tensor(accuracy["all"], dtype=torch.float32),
    }
    for name in (*ATTRIBUTES, "count"):
        scores[f"judge_{name}_accuracy"] = torch.tensor([nan if v is None else v for v in accuracy[name]])
    return scores


_VALUES: dict[str, tuple[str, ...]] = {
    "colour": COLOUR_NAMES, "size": SIZE_NAMES, "position": POSITION_NAMES, "background": BACKGROUND_NAMES,
}


def unstated_counts(sightings: Sequence[Sighting], prompts: Sequence[str]) -> dict[str, dict[str, int]]:
    """How often the judge sees each value of each attribute that the prompts leave out.

    A shape attribute (colour, size, position) counts over the shapes seen in images whose prompt states it
    for none of its shapes; the background over images whose prompt leaves it out. Returns {attribute:
    {value: count}} with every value of the world listed (0 if never seen), for the attributes some prompt
    leaves out.
    """
    counts: dict[str, dict[str, int]] = {}
    for seen, text in zip(sightings, prompts):
        prompt = parse_prompt(text)
        for name in ("colour", "size", "position"):
            if all(getattr(s, name) is None for s in prompt.shapes):
                table = counts.setdefault(name, dict.fromkeys(_VALUES[name], 0))
                for shape in seen.shapes:
                    table[getattr(shape, name)] += 1
        if prompt.background is None:
            counts.setdefault("background", dict.fromkeys(BACKGROUND_NAMES, 0))[seen.background] += 1
    return counts


def normalised_entropy(counts: dict[str, int]) -> float:
    """Entropy of the counts' distribution over its values, divided by log(number of values): 1 is uniform,
    0 a single value. NaN if nothing was counted."""
    total = sum(counts.values())
    if total == 0:
        return float("nan")
    probs = [c / total for c in counts.values() if c]
    return 0.0 - sum(p * math.log(p) for p in probs) / math.log(len(counts))  # 0.0 -: no "-0.0"


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets a [N, D], b [M, D] (as FID):
    |μa − μb|² + Tr(Σa + Σb − 2 (Σa Σb)^½), in float64. Tr (Σa Σb)^½ is the sum of the square roots of the
    eigenvalues of Σa^½ Σb Σa^½ (symmetric, so `eigh` suffices; tiny negative eigenvalues from rounding are
    clipped). Biased upward at small N like FID: compare sets of equal size only."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(a.shape[0], b.shape[0]) < 2:
        raise ValueError(f"need two feature sets [N ≥ 2, D] of one D, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.double(), b.double()
    mu = (a.mean(0) - b.mean(0)).square().sum()
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float(mu + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross)


# Seed of the true renders that samples are compared with: the same references before and after training.
REFERENCE_SEED = 0


def reference_renders(prompts: Sequence[str], seed: int = REFERENCE_SEED) -> torch.Tensor:
    """One true render per prompt (a scene the prompt describes, unstated attributes drawn uniformly as the
    world draws them; `Prompt.sample_scene`), float32 [N, 3, 32, 32] in [0, 1]; seeded, so repeatable."""
    rng = np.random.default_rng(seed)
    arrays = [render(parse_prompt(text).sample_scene(rng)) for text in prompts]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


def judge_summary(
    images: torch.Tensor, prompts: Sequence[str], judge: Judge | None = None, taste: Taste = AESTHETIC_TASTE
) -> dict:
    """The judge's figures for a set of samples: what the report of a task shows.

    images float [N, 3, H, W] in [0, 1] with their N prompts (full or partial). Returns a JSON-able dict:
    `images`; `taste_rate` (fraction that meet `taste`); `realism` (mean p(clean render)) and `realism_rate`
    (fraction with p > 0.5); `stated_accuracy` (per attribute, the mean over images that state it, plus count
    and all); `unstated` (per attribute the prompts leave out: `counts`, the pooled `normalised_entropy`, and
    `per_prompt_normalised_entropy` mean and min over prompts, each prompt's samples pooled); `frechet_distance`
    between the judge's features of the samples and of one true render per sample (`reference_renders`: the
    world's own spread of what the prompts leave out, so both a broken render and a collapse onto one
    background raise it).
    """
    judge = judge or shipped_judge()
    sightings = judge.see(images)
    accuracy = stated_accuracy(sightings, prompts)
    by_prompt: dict[str, list[int]] = {}
    for i, text in enumerate(prompts):
        by_prompt.setdefault(text, []).append(i)
    pooled = unstated_counts(sightings, prompts)
    per_prompt: dict[str, list[float]] = {}
    for text, rows in by_prompt.items():
        for name, counts in unstated_counts([sightings[i] for i in rows], [text] * len(rows)).items():
            if sum(counts.values()):  # a prompt whose samples show no shape has no distribution to measure
                per_prompt.setdefault(name, []).append(normalised_entropy(counts))
    realism = [s.realism for s in sightings]
    return {
        "images": len(sightings),
        "prompts": len(by_prompt),
        "taste": {"size": taste.size, "background": taste.background},
        "taste_rate": sum(taste.met([x.size for x in s.shapes], s.background) for s in sightings) / len(sightings),
        "realism": sum(realism) / len(realism),
        "realism_rate": sum(r > 0.5 for r in realism) / len(realism),
        "frechet_distance": frechet_distance(judge.features(images), judge.features(reference_renders(prompts))),
        "stated_accuracy": {
            name: (sum(v for v in values if v is not None) / n if (n := sum(v is not None for v in values)) else None)
            for name, values in accuracy.items()
        },
        "unstated": {
            name: {
                "counts": counts,
                "normalised_entropy": normalised_entropy(counts),
                "per_prompt_normalised_entropy": {
                    "mean": sum(per_prompt[name]) / len(per_prompt[name]) if per_prompt.get(name) else None,
                    "min": min(per_prompt[name]) if per_prompt.get(name) else None,
                },
            }
            for name, counts in pooled.items()
        },
    }


class JudgeMetric:
    """The evaluation metric `shapes_judge`: per-image scores (`judge_metric`) and, for the report, the figures
    of the whole sample set (`judge_summary`), both by the shipped judge."""

    def __init__(self, judge: Judge | None = None, taste: Taste = AESTHETIC_TASTE) -> None:
        self.judge, self.taste = judge, taste

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        return judge_metric(images, prompts, self.judge, self.taste)

    def summary(self, images: torch.Tensor, prompts: Sequence[str]) -> dict:
        return judge_summary(images, prompts, self.judge, self.taste)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Train the shapes-world judge; the defaults reproduce the shipped one.")
    parser.add_argument("--out", default=str(ASSETS_DIR), help="directory for the weights and the report")
    parser.add_argument("--seed", type=int, default=JUDGE_SEED)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the shipped run used 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = train_judge(args.out, seed=args.seed, steps=args.steps)
    print(json.dumps({k: report[k] for k in ("heldout_accuracy", "heldout_realism")}, indent=2))
