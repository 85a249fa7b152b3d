"""PickScore (Kirstain et al. 2023): a CLIP ViT-H/14 fine-tuned on Pick-a-Pic preferences, used as published
through transformers' ``CLIPModel``. Score = ``logit_scale.exp()`` x cosine(image, prompt) (~18-23)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from fastdag.rewards import register_reward
from fastdag.rewards.loading import clip_cosine, from_pretrained, reward_device


@register_reward("pickscore")
class PickScore:
    """PickScore v1: CLIP ViT-H/14 preference model, logit_scale x cosine(image, prompt)."""

    def __init__(self, model: str = "yuvalkirstain/PickScore_v1",
                 tokenizer: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", device: str = "auto",
                 revision: Optional[str] = None):
        from transformers import AutoTokenizer, CLIPModel

        self.device = reward_device(device)
        self.model = from_pretrained(CLIPModel, model, "reward.kwargs.model", revision=revision,
                                     dtype=torch.float32).to(self.device).eval().requires_grad_(False)
        self.tokenizer = from_pretrained(AutoTokenizer, tokenizer, "reward.kwargs.tokenizer")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        cosine = clip_cosine(self.model, self.tokenizer, images, list(prompts), self.device)
        return self.model.logit_scale.exp().float().cpu() * cosine
