"""Rewards of the shapes world (alignment, aesthetic taste), and the accuracy metrics reported against them.

The prompt is parsed back into what it states (`parse_prompt`), and the attribute classifier reads the image in
the same slot layout, so "does the image show what the prompt says" becomes a mean of per-attribute
log-probabilities. Both rewards add the classifier's realism log-probability, so an image that is not a clean
render of the world (noise, blobs, blur, a broken render) scores low whatever the attribute heads read into it.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from fastdag.toy.classifier import (
    EMPTY,
    IGNORE,
    N_SLOTS,
    ClassifierOutput,
    SceneTargets,
    attribute_accuracy,
    load_classifier,
    realism_log_prob,
    scene_log_likelihood,
)
from fastdag.toy.world import (
    BACKGROUND_NAMES,
    COLOUR_NAMES,
    CORNERS,
    KINDS,
    POSITION_NAMES,
    SIZE_NAMES,
    Prompt,
    parse_caption,
    parse_prompt,
)


@dataclass(frozen=True)
class Taste:
    """A preference over attributes a prompt leaves unstated: each shape's size and the background.

    None prefers nothing. `apply` fills the prompt's unstated attributes with the taste; stated ones stay.
    """

    size: str | None = None
    background: str | None = None

    def apply(self, prompt: Prompt) -> Prompt:
        shapes = tuple(dataclasses.replace(s, size=s.size or self.size) for s in prompt.shapes)
        return Prompt(shapes, prompt.background or self.background)

    def met(self, sizes: Sequence[str], background: str) -> bool:
        """Does an image with shapes of these sizes on this background meet the taste? (No shape: no.)"""
        return bool(sizes) and (self.size is None or all(s == self.size for s in sizes)) and (
            self.background is None or background == self.background
        )


# The aesthetic task's taste: a white background. The world draws 4 backgrounds uniformly, so a base model that
# follows it meets the taste in 1/4 of samples; shapes-tiny, on kind-and-colour prompts, draws white in 14.2% of
# its samples over all 18 prompts (41 / 288, docs/results/2026-12-01-shapes-tiny-base) and 16.7% on the 6 held-out
# ones (16 / 96): inside the 10–20% the task asks for (it draws gray most, 57%). Large shapes on white, the first
# taste, was met in 4.9% / 5.2%: too rare. Size and position are left free: the judge checks that training keeps
# their spread.
AESTHETIC_TASTE = Taste(background="white")


def _placements(prompt: Prompt) -> list[tuple[int, ...]]:
    """Every slot assignment of the prompt's shapes consistent with its stated positions (two shapes: distinct
    corners, as the world draws them). Returns tuples of slot indices, one per shape."""
    pools = [POSITION_NAMES if len(prompt.shapes) == 1 else CORNERS] * len(prompt.shapes)
    options = [[s.position] if s.position is not None else list(pool) for s, pool in zip(prompt.shapes, pools)]
    return [
        tuple(POSITION_NAMES.index(p) for p in combo)
        for combo in itertools.product(*options)
        if len(set(combo)) == len(combo)
    ]


@lru_cache(maxsize=65536)
def _prompt_rows(text: str, taste: Taste | None) -> tuple[tuple[int, ...], ...]:
    """One row per placement of the prompt: the stated targets kind[5], colour[5], size[5], background, then the
    taste's targets size[5], background (IGNORE where the prompt states the attribute or the taste has none)."""
    prompt = parse_prompt(text)
    tasted = taste.apply(prompt) if taste is not None else prompt
    rows = []
    for slots in _placements(prompt):
        kind, colour, size = [EMPTY] * N_SLOTS, [IGNORE] * N_SLOTS, [IGNORE] * N_SLOTS
        taste_size = [IGNORE] * N_SLOTS
        for shape, liked, slot in zip(prompt.shapes, tasted.shapes, slots):
            kind[slot] = 1 + KINDS.index(shape.kind)
            colour[slot] = IGNORE if shape.colour is None else COLOUR_NAMES.index(shape.colour)
            size[slot] = IGNORE if shape.size is None else SIZE_NAMES.index(shape.size)
            if shape.size is None and liked.size is not None:
                taste_size[slot] = SIZE_NAMES.index(liked.size)
        background = IGNORE if prompt.background is None else BACKGROUND_NAMES.index(prompt.background)
        taste_background = IGNORE
        if prompt.background is None and tasted.background is not None:
            taste_background = BACKGROUND_NAMES.index(tasted.background)
        rows.append((*kind, *colour, *size, background, *taste_size, taste_background))
    return tuple(rows)


@dataclass
class PromptTargets:
    """Targets of every placement of B prompts (P placements in all).

    stated: the prompt's own attributes (SceneTargets, P rows; unstated colour/size/background are IGNORE).
    taste_size: int64 [P, N_SLOTS], the taste's size at each shape whose size is unstated, else IGNORE.
    taste_background: int64 [P], the taste's background if the prompt leaves it out, else IGNORE.
    owner: int64 [P], which prompt each placement is of.
    """

    stated: SceneTargets
    taste_size: torch.Tensor
    taste_background: torch.Tensor
    owner: torch.Tensor


def prompt_targets(prompts: Sequence[str], device: torch.device, taste: Taste | None = None) -> PromptTargets:
    """Targets of every placement of every (possibly partial) prompt (see `PromptTargets`).

    A full prompt has one placement, a one-shape prompt without position 5, a two-shape prompt without positions
    12. ValueError names a prompt that is not a (partial) caption of the world.
    """
    rows, owner = [], []
    for i, text in enumerate(prompts):
        placements = _prompt_rows(text, taste)
        rows.extend(placements)
        owner.extend([i] * len(placements))
    table = torch.tensor(rows, dtype=torch.long, device=device)  # [P, 4 · N_SLOTS + 2]
    n = N_SLOTS
    stated = SceneTargets(
        kind=table[:, :n], colour=table[:, n : 2 * n], size=table[:, 2 * n : 3 * n], background=table[:, 3 * n]
    )
    return PromptTargets(stated, table[:, 3 * n + 1 : 4 * n + 1], table[:, -1], torch.tensor(owner, device=device))


def _taste_log_likelihood(out: ClassifierOutput, targets: PromptTargets) -> torch.Tensor:
    """Mean log-probability of the taste's terms per placement, float32 [P] (0 where the taste has none)."""
    sizes = out.size.float().log_softmax(-1).gather(-1, targets.taste_size.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    backgrounds = out.background.float().log_softmax(-1).gather(-1, targets.taste_background.clamp(min=0)[:, None])
    total = torch.where(targets.taste_size == IGNORE, 0.0, sizes).sum(1)
    total = total + torch.where(targets.taste_background == IGNORE, 0.0, backgrounds.squeeze(1))
    terms = (targets.taste_size != IGNORE).sum(1) + (targets.taste_background != IGNORE).long()
    return total / terms.clamp(min=1)


class ShapesAlignmentReward:
    """r(image, prompt) = mean log-probability, under the attribute classifier, of the prompt's stated
    attributes, plus realism_weight · log p(clean render).

    The attribute terms are the kind of each of the 5 position slots (the prompt's shape at its slot, "empty"
    at the others), the colour and size of each shape where stated, and the background where stated: 8 terms
    for a full one-shape caption, 10 for a two-shape one. A prompt that leaves positions out is scored at the
    placement of its shapes that the image supports best (the maximum over placements). exp of the attribute
    part is the geometric mean of the attribute probabilities, so r ≤ 0. The classifier was trained with label
    smoothing 0.05, so in practice r ≈ −0.07 for a clean image that shows exactly its prompt (−0.04 attributes,
    −0.03 realism), each wrong attribute costs about 4–5 nats divided by the number of terms, and an image that
    is not a clean render about 3.7 nats more. A shape in the wrong slot is penalised twice (its slot reads
    empty, and the slot it occupies is not). β · r is the log-reward of DAG.

    Prompts must be (possibly partial) captions of the world (`fastdag.toy.world.describe`); anything else
    raises ValueError. Scores are computed without gradients (a black-box reward), in float32, on the images'
    device.
    """

    taste: Taste | None = None
    taste_weight: float = 0.0
    stated_reduce: str = "mean"

    def __init__(self, path: str | Path | None = None, realism_weight: float = 1.0) -> None:
        """path: classifier weights (a .safetensors file or its directory); default the shipped ones.
        realism_weight: weight of log p(clean render); 0 leaves the attribute terms alone."""
        if realism_weight < 0:
            raise ValueError(f"realism_weight must be ≥ 0, got {realism_weight}")
        self.classifier = load_classifier(path)
        self.realism_weight = realism_weight

    def read(self, images: torch.Tensor) -> ClassifierOutput:
        """Classifier logits for images float [B, 3, H, W] in [0, 1], any H, W (resized with antialiasing)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        device = images.device
        if next(self.classifier.parameters()).device != device:
            self.classifier.to(device)
        size = self.classifier.config.resolution
        x = images.float().clamp(0.0, 1.0)
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return self.classifier(x)

    @staticmethod
    def targets(prompts: Sequence[str], device: torch.device) -> SceneTargets:
        """The prompts' scenes in slot layout; ValueError naming the first prompt that is not a caption."""
        return SceneTargets.from_scenes([parse_caption(p) for p in prompts]).to(device)

    def check_prompts(self, prompts: Sequence[str]) -> None:
        """ValueError naming the first prompt that is not a caption of the world: the trainer asks before any
        model loads (``fastdag.preflight``), instead of failing after a rollout."""
        for prompt in dict.fromkeys(prompts):
            parse_prompt(prompt)  # full or partial captions, as __call__ reads them

    def _checked(self, images: torch.Tensor, prompts: Sequence[str]) -> tuple[ClassifierOutput, SceneTargets]:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        targets = self.targets(prompts, images.device)  # parse first: a bad prompt fails before any compute
        return self.read(images), targets

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """images float [B, 3, H, W] in [0, 1]; prompts, B (partial) captions -> rewards float32 [B], each ≤ 0."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        targets = prompt_targets(prompts, images.device, self.taste)  # parse first: fail before any compute
        out = self.read(images)
        owner = targets.owner
        placed = ClassifierOutput(*(t[owner] for t in (out.kind, out.colour, out.size, out.background, out.realism)))
        per_placement = scene_log_likelihood(placed, targets.stated, self.stated_reduce)  # [P]
        if self.taste is not None and self.taste_weight > 0:
            per_placement = per_placement + self.taste_weight * _taste_log_likelihood(placed, targets)
        best = torch.full((images.shape[0],), float("-inf"), device=images.device)
        best = best.scatter_reduce(0, owner, per_placement, reduce="amax")
        return best + self.realism_weight * realism_log_prob(out)

    @torch.no_grad()
    def attribute_accuracy(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Per-image fraction right of each attribute type: keys shape, colour, size, position, count, background
        and all (see `fastdag.toy.classifier.attribute_accuracy`); each float32 [B]."""
        return attribute_accuracy(*self._checked(images, prompts))

    def accuracy(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Fraction of the prompt's attributes read right per image, float32 [B] in [0, 1]."""
        return self.attribute_accuracy(images, prompts)["all"]


class ShapesAestheticReward(ShapesAlignmentReward):
    """The aesthetic task's reward: r = (the stated attributes' mean log-probability, as `ShapesAlignmentReward`,
    or their sum with stated="sum")
    + taste_weight · (the taste's mean log-probability over the attributes the prompt leaves out)
    + realism_weight · log p(clean render), at the placement of the prompt's shapes the image supports best.

    For "a red circle" under the default taste (AESTHETIC_TASTE, a white background) the stated terms are the
    5 slots' kinds and the colour red, the taste's term the background (white); size and position are left free.
    With stated="mean" (the default, as the alignment reward) one wrong attribute costs ~4.5 / 6 ≈ 0.75 nats and
    missing the taste ~0.5 · 4.7 ≈ 2.3 at taste_weight 0.5: the taste outweighs one stated colour or kind, so a
    wrong colour on white outscores the prompt followed on gray (the judge watches the stated accuracy for it).
    stated="sum" makes the prompt a log-likelihood (one wrong attribute ~4.5 nats, more than the taste), the
    better-ordered reward, but DAG-DB at this task's schedule did not raise it in 46 epochs (the stated terms'
    spread drowns the taste's signal). Measured (DAG-DB, configs/shapes_aesthetic.yaml): the mean at taste weight
    0.15 (with the first taste, large shapes on white) let the classifier's slight preference for gray win
    (white 19% -> 0%); at weight 1.0 and LoRA lr 1e-3 two seeds rose then collapsed after epoch 40-50 (colour
    accuracy −40 points in one); at 0.5 and lr 5e-4 the taste rose 56-76 points in two seeds.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        realism_weight: float = 1.0,
        taste_weight: float = 0.5,
        size: str | None = AESTHETIC_TASTE.size,
        background: str | None = AESTHETIC_TASTE.background,
        stated: str = "mean",
    ) -> None:
        """size, background: the taste (None: no preference); a value not in the world raises ValueError.
        stated: "sum" or "mean" (as `ShapesAlignmentReward`) of the stated attributes' log-probabilities."""
        if size not in (None, *SIZE_NAMES) or background not in (None, *BACKGROUND_NAMES):
            raise ValueError(
                f"taste: size must be one of {SIZE_NAMES} and background one of {BACKGROUND_NAMES}, "
                f"got {size!r}, {background!r}"
            )
        if taste_weight < 0:
            raise ValueError(f"taste_weight must be ≥ 0, got {taste_weight}")
        if stated not in ("mean", "sum"):
            raise ValueError(f"stated must be 'mean' or 'sum', got {stated!r}")
        super().__init__(path, realism_weight)
        self.stated_reduce = stated
        self.taste = Taste(size=size, background=background)
        self.taste_weight = taste_weight


@lru_cache(maxsize=1)
def _shipped_reward() -> ShapesAlignmentReward:
    return ShapesAlignmentReward()


def shapes_accuracy(
    images: torch.Tensor, prompts: Sequence[str], reward: ShapesAlignmentReward | None = None
) -> torch.Tensor:
    """Fraction of each prompt's attributes that the classifier reads right in its image. float32 [B].

    images float [B, 3, H, W] in [0, 1]; reward: whose classifier reads (default: the shipped classifier).
    """
    return (reward or _shipped_reward()).accuracy(images, prompts)


def shapes_attribute_accuracy(
    images: torch.Tensor, prompts: Sequence[str], reward: ShapesAlignmentReward | None = None
) -> dict[str, torch.Tensor]:
    """Per-attribute-type accuracy per image ("colour right", "shape right", ...): dict of float32 [B].

    Averaging `["colour"]` over images and prompts gives "colour right X%"; keys as in
    `ShapesAlignmentReward.attribute_accuracy`.
    """
    return (reward or _shipped_reward()).attribute_accuracy(images, prompts)
