"""FLUX.1: a CLIP text encoder (pooled) and T5 (the sequence), a ``FluxTransformer2DModel`` on 2x2-packed latents
predicting the rectified-flow velocity, with distilled guidance (FLUX.1-dev: a guidance embedding, one pass, no CFG;
schnell: none), and a ``FlowMatchEulerDiscreteScheduler`` with resolution-dependent shifting of linspace(1, 1/T, T).
States are kept unpacked, [C, H, W], so DAG's flow network sees an image; the family packs them for the
transformer. The LoRA loads back with ``FluxPipeline.load_lora_weights``."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from fastdag.families.base import Cond
from fastdag.families.sd3 import FlowMatchingFamily


class FluxFamily(FlowMatchingFamily):
    name = "flux"
    pipeline_class = "FluxPipeline"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    t5_tokenizer_name = "tokenizer_2"

    @property
    def uses_cfg(self) -> bool:
        return False  # guidance is an input of the transformer (distilled), not a second pass

    def _latent_shape(self, resolution: Optional[int]) -> tuple[int, ...]:
        native = int(getattr(self.pipeline, "default_sample_size", 128))  # latent side at the pipeline's default size
        side = self._latent_side(native, resolution, multiple=2)
        return (self.denoiser.config.in_channels // 4, side, side)

    @property
    def image_seq_len(self) -> int:
        return (self.latent_shape[1] // 2) * (self.latent_shape[2] // 2)

    def sigma_spacing(self, num_steps: int) -> Optional[list[float]]:
        return np.linspace(1.0, 1 / num_steps, num_steps).tolist()  # FluxPipeline's, before the shift

    def _encode(self, prompts: list[str]) -> Cond:
        embeds, pooled, _ = self.pipeline.encode_prompt(prompts, None, device=self._text_device,
                                                        max_sequence_length=self.max_sequence_length)
        return Cond(embeds, pooled)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, (H/2)(W/2), 4C]: FluxPipeline._pack_latents."""
        b, c, h, w = x.shape
        return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)

    def unpack(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, (H/2)(W/2), 4C] -> [B, C, H, W]: FluxPipeline._unpack_latents."""
        c, h, w = self.latent_shape
        b = tokens.shape[0]
        return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Optional[Cond], guidance: Optional[float] = None) -> torch.Tensor:
        b, (_, h, w) = x.shape[0], self.latent_shape
        img_ids = self.pipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, self.dtype)
        txt_ids = torch.zeros(cond.embeds.shape[1], 3, device=x.device, dtype=self.dtype)
        g = None
        if self.denoiser.config.guidance_embeds:
            g = torch.full((b,), 1.0 if guidance is None else float(guidance), device=x.device, dtype=torch.float32)
        out = self.denoiser(hidden_states=self.pack(x.to(self.dtype)), timestep=t.to(self.dtype) / 1000, guidance=g,
                            pooled_projections=cond.pooled, encoder_hidden_states=cond.embeds, txt_ids=txt_ids,
                            img_ids=img_ids).sample
        return self.unpack(out)
