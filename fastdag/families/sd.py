"""Stable Diffusion 1.x / 2.x: CLIP text encoder, latent ``UNet2DConditionModel`` with cross-attention, CFG, DDIM.

The paper's family (SD 1.5) and the embedded default's (shapes-tiny). Loaded from a ``StableDiffusionPipeline``;
the LoRA loads back with ``StableDiffusionPipeline.load_lora_weights``.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastdag.config import SampleConfig
from fastdag.families.base import Cond, ModelFamily
from fastdag.samplers.ddim import DDIMSampler, ddim_scheduler_from, ddim_step_schedule, step_settings


class UNetDDIMFamily(ModelFamily):
    """What the UNet families share: the pipeline's scheduler replaced by DDIM on its noise schedule."""

    lora_key_conversion = True

    def __init__(self, pipeline, device: torch.device, dtype: torch.dtype, resolution: Optional[int] = None):
        self.scheduler = ddim_scheduler_from(pipeline.scheduler)
        pipeline.scheduler = self.scheduler
        self.prediction_type, self.clip_sample_range = step_settings(self.scheduler.config)
        super().__init__(pipeline, device, dtype, resolution)

    @property
    def unet(self) -> torch.nn.Module:
        return self.denoiser

    def _latent_shape(self, resolution: Optional[int]) -> tuple[int, ...]:
        size = self.denoiser.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        if resolution is not None:
            h = w = self._latent_side(h, resolution)
        return (self.denoiser.config.in_channels, h, w)

    @property
    def flow_cond_dim(self) -> Optional[int]:
        return self.denoiser.config.cross_attention_dim if self.conditional else None

    def make_sampler(self, num_steps: int, sample: SampleConfig, *, reduce: str = "mean", backend: str = "auto",
                     stochasticity: Optional[float] = None) -> DDIMSampler:
        schedule = ddim_step_schedule(self.scheduler, num_steps, self.device)
        eta = sample.eta if stochasticity is None else stochasticity
        return DDIMSampler(schedule, eta, reduce=reduce, backend=backend, prediction_type=self.prediction_type,
                           clip_sample_range=self.clip_sample_range)


class SDFamily(UNetDDIMFamily):
    name = "sd"
    pipeline_class = "StableDiffusionPipeline"
    text_encoder_names = ("text_encoder",)

    def _encode(self, prompts: list[str]) -> Cond:
        """CLIP's last hidden states [B, L, D] (L the tokenizer's model_max_length), as the pipeline's."""
        tok = self.pipeline.tokenizer
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        return Cond(self.pipeline.text_encoder(ids.input_ids.to(self._text_device))[0])

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Optional[Cond], guidance: Optional[float] = None) -> torch.Tensor:
        return self.denoiser(x.to(self.dtype), t, encoder_hidden_states=cond.embeds).sample
