"""Attribute classifier for the shapes world: the reader behind `ShapesAlignmentReward`.

The classifier is slot-based, following the world's fixed positions: for each of the 5 position slots it predicts
the kind (or "empty"), the colour and the size, and it predicts the background colour once. That one layout
reads one- and two-shape scenes alike. It also predicts *realism*, the probability that the image is a clean
render of the world, trained against the negatives of `fastdag.toy.negatives` (noise, heavy blur, colour blobs,
broken renders), so that a reward built on it cannot be raised by images that are not renders at all.

Architectures (`ClassifierConfig.arch`): "flat", the reward's (~0.6 M parameters, ~2.5 MB of float32
weights): 5 convolutions down to an 8 × 8 map, flattened (so every slot head sees where things are), then an
MLP; "residual", the independent judge's (`fastdag.toy.judge`): a 5 × 5 stem and residual GroupNorm/SiLU blocks.

Training data are fresh generator images each step, from the whole world (held-out prompts included: the judge
must read them). Augmentation (a 3 × 3 blur or `soften`'s 2× down-and-up, noise, small per-channel shifts)
stands in for the softness of images decoded by a small VAE, so the judge does not only work on crisp renders.
Label smoothing keeps its log-probabilities bounded, which the reward needs (see LABEL_SMOOTHING).
Negatives carry no attribute targets: only the realism output learns from them.
"""
from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from fastdag.toy.negatives import HACKED_BANK, HACKED_TYPES, make_negatives, negative_batch
from fastdag.toy.world import (
    BACKGROUND_NAMES,
    COLOUR_NAMES,
    KINDS,
    POSITION_NAMES,
    RESOLUTION,
    SIZE_NAMES,
    Scene,
    sample_batch,
)

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"
WEIGHTS_NAME = "shapes_classifier.safetensors"
REPORT_NAME = "shapes_classifier.json"

# Kind class 0 means the slot is empty; kind k + 1 is KINDS[k].
EMPTY = 0
# Target value of colour/size at an empty slot (cross_entropy's ignore_index).
IGNORE = -1
N_SLOTS = len(POSITION_NAMES)
ARCHITECTURES = ("flat", "residual")
# Smoothing bounds the log-probability the classifier gives a wrong attribute near log(0.05 / classes), −4.8 for
# the 6 colours, so one confidently wrong term cannot swamp the mean log-likelihood that the reward is; a right
# one tends to log(1 − 0.05 + 0.05 / classes) ≈ −0.04.
LABEL_SMOOTHING = 0.05
_CLASSES = {
    "kinds": list(KINDS),
    "colours": list(COLOUR_NAMES),
    "sizes": list(SIZE_NAMES),
    "positions": list(POSITION_NAMES),
    "backgrounds": list(BACKGROUND_NAMES),
}


@dataclass(frozen=True)
class ClassifierConfig:
    """Architecture of the classifier."""

    arch: str = "flat"
    """"flat" (the reward's CNN) or "residual" (the judge's)."""
    width: int = 32
    """Channels of the first two convolutions; the last three have twice as many."""
    hidden: int = 128
    """Width of the MLP over the flattened 8 × 8 feature map."""
    resolution: int = RESOLUTION
    """Input side in pixels; the reward resizes images to it."""

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"classifier arch must be one of {ARCHITECTURES}, got {self.arch!r}")


@dataclass
class SceneTargets:
    """Ground truth of B scenes in slot layout (slot s is POSITION_NAMES[s]).

    kind: int64 [B, N_SLOTS], EMPTY or 1 + index into KINDS.
    colour, size: int64 [B, N_SLOTS], class index, IGNORE at empty slots.
    background: int64 [B].
    """

    kind: torch.Tensor
    colour: torch.Tensor
    size: torch.Tensor
    background: torch.Tensor

    @classmethod
    def from_scenes(cls, scenes: Sequence[Scene]) -> SceneTargets:
        kind = torch.full((len(scenes), N_SLOTS), EMPTY, dtype=torch.long)
        colour = torch.full((len(scenes), N_SLOTS), IGNORE, dtype=torch.long)
        size = torch.full((len(scenes), N_SLOTS), IGNORE, dtype=torch.long)
        background = torch.empty(len(scenes), dtype=torch.long)
        for i, scene in enumerate(scenes):
            for shape in scene.shapes:
                slot = POSITION_NAMES.index(shape.position)
                kind[i, slot] = 1 + KINDS.index(shape.kind)
                colour[i, slot] = COLOUR_NAMES.index(shape.colour)
                size[i, slot] = SIZE_NAMES.index(shape.size)
            background[i] = BACKGROUND_NAMES.index(scene.background)
        return cls(kind=kind, colour=colour, size=size, background=background)

    def to(self, device: torch.device) -> SceneTargets:
        return SceneTargets(*(t.to(device) for t in (self.kind, self.colour, self.size, self.background)))


@dataclass
class ClassifierOutput:
    """Logits of the classifier for B images.

    kind: [B, N_SLOTS, 1 + len(KINDS)] (class EMPTY first).
    colour: [B, N_SLOTS, len(COLOUR_NAMES)].
    size: [B, N_SLOTS, len(SIZE_NAMES)].
    background: [B, len(BACKGROUND_NAMES)].
    realism: [B], the logit of "a clean render of the world".
    """

    kind: torch.Tensor
    colour: torch.Tensor
    size: torch.Tensor
    background: torch.Tensor
    realism: torch.Tensor


class _Residual(nn.Module):
    """x + conv(SiLU(GroupNorm(conv(SiLU(GroupNorm(x)))))), channels unchanged."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(8, channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(8, channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _features(config: ClassifierConfig) -> nn.Sequential:
    """Image [B, 3, R, R] -> features [B, 2 · width, R / 4, R / 4]."""
    w = config.width
    if config.arch == "flat":
        return nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(w, w, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.GELU(),
        )
    return nn.Sequential(
        nn.Conv2d(3, w, 5, padding=2),
        _Residual(w),
        nn.Conv2d(w, 2 * w, 3, stride=2, padding=1),
        _Residual(2 * w),
        nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1),
        _Residual(2 * w),
        nn.GroupNorm(8, 2 * w),
        nn.SiLU(),
    )


class ShapesClassifier(nn.Module):
    """Reads a shapes-world image: per slot kind/colour/size, the background, and realism."""

    def __init__(self, config: ClassifierConfig = ClassifierConfig()) -> None:
        super().__init__()
        self.config = config
        w = config.width
        self.features = _features(config)
        self._head_sizes = (
            N_SLOTS * (1 + len(KINDS)),
            N_SLOTS * len(COLOUR_NAMES),
            N_SLOTS * len(SIZE_NAMES),
            len(BACKGROUND_NAMES),
            1,
        )
        cells = (config.resolution // 4) ** 2
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * w * cells, config.hidden),
            nn.GELU(),
            nn.Linear(config.hidden, sum(self._head_sizes)),
        )

    def forward(self, images: torch.Tensor) -> ClassifierOutput:
        """images: float [B, 3, resolution, resolution] in [0, 1]."""
        logits = self.head(self.features(images * 2.0 - 1.0))  # [B, sum(head sizes)]
        kind, colour, size, background, realism = logits.split(self._head_sizes, dim=1)
        b = images.shape[0]
        return ClassifierOutput(
            kind=kind.reshape(b, N_SLOTS, -1),
            colour=colour.reshape(b, N_SLOTS, -1),
            size=size.reshape(b, N_SLOTS, -1),
            background=background,
            realism=realism.squeeze(1),
        )


def _gather_log_probs(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per slot, 0 where target is IGNORE. logits [B, S, C], target [B, S] -> [B, S]."""
    log_probs = logits.float().log_softmax(dim=-1)
    picked = log_probs.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(target == IGNORE, torch.zeros_like(picked), picked)


def scene_log_likelihood(out: ClassifierOutput, targets: SceneTargets, reduce: str = "mean") -> torch.Tensor:
    """Mean (or, with reduce="sum", total) log-probability of the scene's attributes. Returns float32 [B] ≤ 0.

    The terms are: the kind of each of the N_SLOTS slots (EMPTY for unmentioned ones), the colour and the size
    of each shape, and the background: 5 + 2 · (number of shapes) + 1 terms for a full scene. A colour, size or
    background that is IGNORE (unstated by a partial prompt) is not a term.
    """
    terms = N_SLOTS + (targets.colour != IGNORE).sum(1) + (targets.size != IGNORE).sum(1)
    terms = terms + (targets.background != IGNORE).long()
    total = (
        _gather_log_probs(out.kind, targets.kind).sum(1)
        + _gather_log_probs(out.colour, targets.colour).sum(1)
        + _gather_log_probs(out.size, targets.size).sum(1)
        + _gather_log_probs(out.background.unsqueeze(1), targets.background.unsqueeze(1)).squeeze(1)
    )
    return total if reduce == "sum" else total / terms


def attribute_accuracy(out: ClassifierOutput, targets: SceneTargets) -> dict[str, torch.Tensor]:
    """Per-image fraction of each attribute type read right. Every value is float32 [B] in [0, 1].

    Each attribute is judged on its own: the prompt's shapes are matched to the shapes the classifier sees
    (occupied slots) by the one-to-one assignment that agrees on the most attributes (ties go to the one with
    more shapes in their own slot), and a prompt shape with no partner gets every attribute wrong. So a red
    circle drawn at the wrong corner still has its colour and kind right, and only its position wrong.

    shape, colour, size, position: fraction of the prompt's shapes whose partner has that attribute.
    count: 1 if the image shows as many shapes as the prompt names.
    background: the background colour.
    all: every attribute above together (4 per shape, plus count and background), the `shapes_accuracy`.
    """
    occupied = targets.kind != EMPTY  # [B, S]
    seen = out.kind.argmax(-1) != EMPTY
    # agree[b, t, s, a]: does the shape seen at slot s have attribute a of the prompt's shape at slot t?
    agree = torch.stack(
        [
            out.kind.argmax(-1).unsqueeze(1) == targets.kind.unsqueeze(2),
            out.colour.argmax(-1).unsqueeze(1) == targets.colour.unsqueeze(2),
            out.size.argmax(-1).unsqueeze(1) == targets.size.unsqueeze(2),
            torch.eye(N_SLOTS, dtype=torch.bool, device=seen.device).expand(seen.shape[0], -1, -1),
        ],
        dim=-1,
    ).cpu()  # [B, S, S, 4]: kind, colour, size, position
    right = torch.zeros(seen.shape[0], 4)
    for b, (wanted, drawn) in enumerate(zip(occupied.cpu(), seen.cpu())):
        wanted_slots = wanted.nonzero().flatten().tolist()
        drawn_slots: list = drawn.nonzero().flatten().tolist()
        best, best_score = torch.zeros(4), -1.0
        # A prompt has at most 2 shapes and an image at most 5: enumerating the assignments is cheap.
        for partners in itertools.permutations(drawn_slots + [None] * len(wanted_slots), len(wanted_slots)):
            hits = sum(
                (agree[b, t, s].float() for t, s in zip(wanted_slots, partners) if s is not None), torch.zeros(4)
            )
            score = hits.sum().item() + 1e-3 * hits[3].item()
            if score > best_score:
                best, best_score = hits, score
        right[b] = best
    right = right.to(seen.device)
    n_shapes = occupied.sum(1).float()
    count = (seen.sum(1) == occupied.sum(1)).float()
    background = (out.background.argmax(-1) == targets.background).float()
    return {
        "shape": right[:, 0] / n_shapes,
        "colour": right[:, 1] / n_shapes,
        "size": right[:, 2] / n_shapes,
        "position": right[:, 3] / n_shapes,
        "count": count,
        "background": background,
        "all": (right.sum(1) + count + background) / (4 * n_shapes + 2),
    }


def realism_log_prob(out: ClassifierOutput) -> torch.Tensor:
    """log p(clean render) per image, float32 [B], ≤ 0 (about −0.03 for a render, −3.7 for a negative)."""
    return F.logsigmoid(out.realism.float())


def classifier_loss(
    out: ClassifierOutput,
    targets: SceneTargets,
    label_smoothing: float = LABEL_SMOOTHING,
    n_negatives: int = 0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum of the mean cross-entropies of the five heads (colour and size over occupied slots only).

    The first B − n_negatives rows of `out` are renders with `targets`; the last n_negatives rows are negatives,
    which only the realism head learns from (binary cross-entropy, targets smoothed like the attributes').
    """
    n_renders = out.kind.shape[0] - n_negatives
    ce = partial(F.cross_entropy, label_smoothing=label_smoothing, ignore_index=IGNORE)
    real = torch.arange(out.kind.shape[0]) < n_renders
    realism_target = torch.where(real, 1.0 - label_smoothing / 2, label_smoothing / 2)
    losses = {
        "kind": ce(out.kind[:n_renders].flatten(0, 1), targets.kind.flatten()),
        "colour": ce(out.colour[:n_renders].flatten(0, 1), targets.colour.flatten()),
        "size": ce(out.size[:n_renders].flatten(0, 1), targets.size.flatten()),
        "background": ce(out.background[:n_renders], targets.background),
        "realism": F.binary_cross_entropy_with_logits(out.realism.float(), realism_target.to(out.realism.device)),
    }
    loss = sum(losses.values())
    return loss, {name: value.item() for name, value in losses.items()}


def soften(images: torch.Tensor) -> torch.Tensor:
    """Halves the resolution and restores it (bilinear, antialiased): the blur of a small VAE's decode.

    images: float [B, 3, H, W] -> same shape.
    """
    h, w = images.shape[-2:]
    half = F.interpolate(images, size=(h // 2, w // 2), mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(half, size=(h, w), mode="bilinear", align_corners=False)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random blur, per-channel shift and Gaussian noise, per image. images: [B, 3, H, W] in [0, 1]."""
    b = images.shape[0]

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(b, *shape, generator=generator)

    taps = torch.tensor([1.0, 2.0, 1.0])
    kernel = (torch.outer(taps, taps) / 16).expand(3, 1, 3, 3)
    binomial = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    # A third of the images keep their edges, a third move towards a 3 × 3 binomial blur, a third towards
    # `soften`, each by a random fraction.
    mode = torch.randint(3, (b, 1, 1, 1), generator=generator)
    blurred = torch.where(mode == 1, binomial, soften(images))
    images = images + (mode > 0) * uniform(0.0, 1.0, 1, 1, 1) * (blurred - images)
    # ±0.04 per channel is well under the smallest channel gap between two colours of the world (~0.27).
    images = images + uniform(-0.04, 0.04, 3, 1, 1)
    images = images + uniform(0.0, 0.05, 1, 1, 1) * torch.randn(images.shape, generator=generator)
    return images.clamp(0.0, 1.0)


@torch.no_grad()
def evaluate_classifier(
    model: ShapesClassifier,
    rng: np.random.Generator,
    n_images: int,
    batch_size: int = 256,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Mean `attribute_accuracy` on `n_images` fresh generator images, plus `scene`: all terms right.

    transform: applied to each image batch [B, 3, H, W] before the classifier (e.g. `soften`); default none.
    """
    model.eval()
    sums: dict[str, float] = {}
    done = 0
    while done < n_images:
        batch = sample_batch(rng, min(batch_size, n_images - done), exclude_heldout=False)
        images = batch.images if transform is None else transform(batch.images)
        accuracy = attribute_accuracy(model(images), SceneTargets.from_scenes(batch.scenes))
        accuracy["scene"] = (accuracy["all"] == 1.0).float()
        for name, value in accuracy.items():
            sums[name] = sums.get(name, 0.0) + value.sum().item()
        done += len(batch.images)
    return {name: total / n_images for name, total in sums.items()}


@torch.no_grad()
def evaluate_realism(
    model: ShapesClassifier, rng: np.random.Generator, generator: torch.Generator, n_per_type: int,
    types: Sequence[str] = HACKED_TYPES,
) -> dict[str, float]:
    """Fraction of images the realism output gets right (p > 0.5 for renders, < 0.5 for negatives), per type.

    Keys: "render" and "render_softened" (fresh world images, as is and after `soften`), then each of
    `types`, each on `n_per_type` fresh images (hacked: drawn from the bank's held-out split; types whose bank
    is missing are left out).
    """
    model.eval()
    renders = sample_batch(rng, n_per_type, exclude_heldout=False).images
    result = {
        "render": (model(renders).realism > 0).float().mean().item(),
        "render_softened": (model(soften(renders)).realism > 0).float().mean().item(),
    }
    for kind in types:
        if kind == "hacked" and not HACKED_BANK.is_file():
            continue
        negatives = make_negatives(kind, n_per_type, rng, generator, split="heldout")
        result[kind] = (model(negatives).realism < 0).float().mean().item()
    return result


def train_classifier(
    out_dir: str | Path,
    seed: int = 0,
    steps: int = 2000,
    batch_size: int = 64,
    negatives_per_type: int = 8,
    lr: float = 2e-3,
    eval_images: int = 4096,
    progress: bool = True,
    config: ClassifierConfig = ClassifierConfig(),
    augmentation: Callable[[torch.Tensor, torch.Generator], torch.Tensor] = augment,
    weights_name: str = WEIGHTS_NAME,
    report_name: str = REPORT_NAME,
    negative_types: Sequence[str] = HACKED_TYPES,
) -> dict:
    """Trains the classifier on fresh generator batches and writes `weights_name` and `report_name` in `out_dir`.

    Each step sees `batch_size` renders and `negatives_per_type` negatives of each of `negative_types`, all passed
    through `augmentation(images, generator)`. Seeded: the weights, the training images and negatives, the
    augmentation and the evaluation images all derive from `seed`, the training and evaluation streams from two
    independent children of SeedSequence(seed). AdamW with linear warm-up over the first 5% of steps, then
    cosine decay to 0.

    Returns the report written to `report_name`: config, classes, training settings and time,
    `heldout_accuracy` (see `evaluate_classifier`) on `eval_images` images never used in training,
    `heldout_accuracy_softened` on the same images after `soften`, and `heldout_realism` (`evaluate_realism`,
    eval_images // 4 per type).
    """
    if steps < 1 or batch_size < 1 or eval_images < 4 or negatives_per_type < 0:
        raise ValueError(
            f"steps and batch_size must be ≥ 1, eval_images ≥ 4, negatives_per_type ≥ 0; got {steps}, "
            f"{batch_size}, {eval_images}, {negatives_per_type}"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    train_seq, eval_seq = np.random.SeedSequence(seed).spawn(2)
    data_rng = np.random.default_rng(train_seq)
    augment_gen = torch.Generator().manual_seed(seed)
    negative_gen = torch.Generator().manual_seed(seed + 1)

    model = ShapesClassifier(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)),
    )

    start = time.perf_counter()
    bar = tqdm(range(steps), desc="shapes classifier", disable=not progress)
    model.train()
    for _ in bar:
        batch = sample_batch(data_rng, batch_size, exclude_heldout=False)
        images = torch.cat([batch.images, negative_batch(negatives_per_type, data_rng, negative_gen, negative_types)])
        n_negatives = images.shape[0] - batch_size
        loss, metrics = classifier_loss(
            model(augmentation(images, augment_gen)), SceneTargets.from_scenes(batch.scenes), n_negatives=n_negatives
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    train_seconds = time.perf_counter() - start

    accuracy = evaluate_classifier(model, np.random.default_rng(eval_seq), eval_images)
    softened = evaluate_classifier(model, np.random.default_rng(eval_seq), eval_images, transform=soften)
    realism = evaluate_realism(
        model, np.random.default_rng(eval_seq.spawn(1)[0]), torch.Generator().manual_seed(seed + 2), eval_images // 4,
    )
    report = {
        "config": asdict(config),
        "classes": _CLASSES,
        "parameters": sum(p.numel() for p in model.parameters()),
        "training": {
            "seed": seed,
            "steps": steps,
            "batch_size": batch_size,
            "negatives_per_type": negatives_per_type,
            "negative_types": list(negative_types),
            "augmentation": augmentation.__module__ + "." + augmentation.__qualname__,
            "lr": lr,
            "seconds": round(train_seconds, 1),
            "torch_threads": torch.get_num_threads(),
            "final_losses": metrics,
        },
        "heldout_images": eval_images,
        "heldout_seed": f"SeedSequence({seed}).spawn(2)[1]; training used spawn(2)[0]",
        "heldout_accuracy": accuracy,
        "heldout_accuracy_softened": softened,
        "heldout_realism": realism,
        "heldout_realism_images_per_type": eval_images // 4,
    }
    save_file(
        {name: p.detach().contiguous() for name, p in model.state_dict().items()},
        str(out_dir / weights_name),
        metadata={"config": json.dumps(asdict(config)), "classes": json.dumps(_CLASSES)},
    )
    (out_dir / report_name).write_text(json.dumps(report, indent=2) + "\n")
    return report


def load_classifier(
    path: str | Path | None = None, device: torch.device | str = "cpu", weights_name: str = WEIGHTS_NAME
) -> ShapesClassifier:
    """Loads a classifier written by `train_classifier` (default: the one shipped in fastdag/assets/), in eval mode.

    path: a .safetensors file, or a directory holding `weights_name`. Raises ValueError if the weights were
    trained for a world with other attribute values.
    """
    path = Path(path) if path is not None else ASSETS_DIR / weights_name
    if path.is_dir():
        path = path / weights_name
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    if json.loads(metadata["classes"]) != _CLASSES:
        raise ValueError(f"{path} was trained for other world classes: {metadata['classes']}")
    model = ShapesClassifier(ClassifierConfig(**json.loads(metadata["config"])))
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        description="Train the shapes-world classifier; the defaults reproduce the shipped one.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--out", default=str(ASSETS_DIR), help="directory for the weights and the report")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch-size", type=int, dest="batch_size")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the shipped run used 1)")
    options = vars(parser.parse_args())
    torch.set_num_threads(options.pop("threads"))
    result = train_classifier(options.pop("out"), **options)
    print(json.dumps({k: result[k] for k in ("heldout_accuracy", "heldout_realism")}, indent=2))
