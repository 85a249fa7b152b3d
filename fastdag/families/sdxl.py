"""Stable Diffusion XL: two CLIP text encoders (penultimate hidden states concatenated, pooled projection of the
second), a ``UNet2DConditionModel`` with ``text_time`` conditioning (pooled embedding + original/crop/target size
ids), CFG, sampled with DDIM on its noise schedule. The LoRA loads back with
``StableDiffusionXLPipeline.load_lora_weights``."""
from __future__ import annotations

from typing import Optional

import torch

from fastdag.families.base import Cond
from fastdag.families.sd import UNetDDIMFamily


class SDXLFamily(UNetDDIMFamily):
    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    text_encoder_names = ("text_encoder", "text_encoder_2")

    def __init__(self, pipeline, device: torch.device, dtype: torch.dtype, resolution: Optional[int] = None):
        super().__init__(pipeline, device, dtype, resolution)
        h, w = (s * self.vae_scale_factor for s in self.latent_shape[1:])
        # (original size, crop top-left, target size): the unconditioned full-frame image at the sampled resolution,
        # as StableDiffusionXLPipeline's defaults
        self.time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32, device=device)  # [1, 6]

    def _encode(self, prompts: list[str]) -> Cond:
        embeds, _, pooled, _ = self.pipeline.encode_prompt(prompts, device=self._text_device, num_images_per_prompt=1,
                                                           do_classifier_free_guidance=False)
        return Cond(embeds, pooled)

    def encode_negative(self, prompt: str) -> Optional[Cond]:
        """The pipeline's default: zeros for an empty negative prompt (``force_zeros_for_empty_prompt``)."""
        if prompt == "" and self.pipeline.config.get("force_zeros_for_empty_prompt", True):
            like = self.encode_prompts([""])
            return Cond(torch.zeros_like(like.embeds), torch.zeros_like(like.pooled))
        return self.encode_prompts([prompt])

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Optional[Cond], guidance: Optional[float] = None) -> torch.Tensor:
        added = {"text_embeds": cond.pooled, "time_ids": self.time_ids.to(cond.pooled.dtype).expand(x.shape[0], -1)}
        return self.denoiser(x.to(self.dtype), t, encoder_hidden_states=cond.embeds, added_cond_kwargs=added).sample
