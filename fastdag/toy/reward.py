"""Prompt-alignment reward for the shapes world, and the accuracy metrics reported against it.

The prompt is parsed back into its scene (`parse_caption`), and the attribute classifier reads the image in the
same slot layout, so "does the image show what the prompt says" becomes a sum of per-attribute log-probabilities.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from fastdag.toy.classifier import (
    ClassifierOutput,
    SceneTargets,
    attribute_accuracy,
    load_classifier,
    scene_log_likelihood,
)
from fastdag.toy.world import parse_caption


class ShapesAlignmentReward:
    """r(image, prompt) = mean log-probability, under the attribute classifier, of the prompt's attributes.

    The terms are the kind of each of the 5 position slots (the prompt's shape at its slot, "empty" at the
    others), the colour and size of each shape the prompt mentions, and the background: 8 terms for a one-shape
    prompt, 10 for a two-shape one. exp(r) is the geometric mean of the attribute probabilities, so r ≤ 0.
    The classifier was trained with label smoothing 0.05, so in practice r ≈ −0.04 for an image that shows
    exactly its prompt, and each wrong attribute costs about 4–5 nats divided by the number of terms. A shape
    in the wrong slot is penalised twice (its slot reads empty, and the slot it occupies is not). β · r is the
    log-reward of DAG.

    Prompts must be captions of the world (`fastdag.toy.world.caption`); anything else raises ValueError.
    Scores are computed without gradients (a black-box reward), in float32, on the images' device.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        """path: classifier weights (a .safetensors file or its directory); default the shipped ones."""
        self.classifier = load_classifier(path)

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
            parse_caption(prompt)

    def _checked(self, images: torch.Tensor, prompts: Sequence[str]) -> tuple[ClassifierOutput, SceneTargets]:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        targets = self.targets(prompts, images.device)  # parse first: a bad prompt fails before any compute
        return self.read(images), targets

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """images float [B, 3, H, W] in [0, 1]; prompts, B captions -> rewards float32 [B], each ≤ 0."""
        return scene_log_likelihood(*self._checked(images, prompts))

    @torch.no_grad()
    def attribute_accuracy(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Per-image fraction right of each attribute type: keys shape, colour, size, position, count, background
        and all (see `fastdag.toy.classifier.attribute_accuracy`); each float32 [B]."""
        return attribute_accuracy(*self._checked(images, prompts))

    def accuracy(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Fraction of the prompt's attributes read right per image, float32 [B] in [0, 1]."""
        return self.attribute_accuracy(images, prompts)["all"]


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
