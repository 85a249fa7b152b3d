"""Sample diversity of an SD model's evaluation: the mean pairwise cosine distance of CLIP image embeddings among
the samples of each prompt (the paper's diversity measure; 0 when a prompt's samples are all alike).

    eval.metric: clip_diversity        # eval.metric_kwargs: {model: openai/clip-vit-large-patch14, device: auto}
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from fastdag.rewards.loading import from_pretrained, reward_device
from fastdag.rewards.preprocess import clip_pixels


def pairwise_cosine_distance(embeddings: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """Per sample, the mean cosine distance (1 − cos) of its embedding to those of the other samples of its
    prompt: float32 [B] (NaN for a prompt with one sample). The mean over samples is the mean over prompts of
    the per-prompt mean pairwise distance when every prompt has as many samples."""
    e = embeddings.float()
    e = e / e.norm(dim=-1, keepdim=True)
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    out = torch.full((len(prompts),), float("nan"))
    for rows in groups.values():
        if len(rows) < 2:
            continue
        g = e[rows]
        distance = 1 - g @ g.T  # [n, n], 0 on the diagonal
        out[rows] = (distance.sum(1) / (len(rows) - 1)).cpu()
    return out


class ClipDiversity:
    """The metric `clip_diversity`: {"clip_diversity": per-sample mean pairwise cosine distance [B]}."""

    def __init__(self, model: str = "openai/clip-vit-large-patch14", device: str = "auto",
                 revision: Optional[str] = None):
        from transformers import CLIPVisionModelWithProjection

        self.device = reward_device(device)
        self.model = from_pretrained(CLIPVisionModelWithProjection, model, "eval.metric_kwargs.model",
                                     revision=revision, dtype=torch.float32).to(self.device).eval().requires_grad_(False)
        self.size = self.model.config.image_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        embeds = self.model(pixel_values=clip_pixels(images, self.size, self.device)).image_embeds
        return {"clip_diversity": pairwise_cosine_distance(embeds, prompts)}
