"""Stable Diffusion 3 / 3.5: two CLIP text encoders and T5 (a joint sequence, plus pooled CLIP embeddings), an
``SD3Transformer2DModel`` predicting the rectified-flow velocity, CFG, and a ``FlowMatchEulerDiscreteScheduler``
(fixed shift, or dynamic shifting for SD3.5). Sampled with Flow-GRPO's SDE (or CPS) for log-probs; noise level 0
is the pipeline's Euler sampler. The LoRA loads back with ``StableDiffusion3Pipeline.load_lora_weights``."""
from __future__ import annotations

from typing import Optional

import torch

from fastdag.config import SampleConfig
from fastdag.families.base import Cond, ModelFamily
from fastdag.samplers.flow import FlowSampler, flow_sigmas

# Flow-GRPO's LoRA targets on the MM-DiT blocks: the image and the text streams' attention projections
MMDIT_LORA_TARGETS = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
                      "attn.to_out.0", "attn.to_q", "attn.to_v"]


class FlowMatchingFamily(ModelFamily):
    """What the rectified-flow families share: the scheduler's sigmas and the flow SDE sampler."""

    denoiser_name = "transformer"
    lora_targets = MMDIT_LORA_TARGETS
    default_sequence_length = 256  # T5 tokens: the pipelines' default for SD3 and Flow-GRPO's for FLUX

    @property
    def max_sequence_length(self) -> int:
        """T5 tokens per prompt: the default, or the T5 tokenizer's length where that is shorter (tiny models)."""
        tokenizer = getattr(self.pipeline, self.t5_tokenizer_name, None)
        limit = getattr(tokenizer, "model_max_length", None) or self.default_sequence_length
        return min(self.default_sequence_length, int(limit))

    @property
    def scheduler(self):
        return self.pipeline.scheduler

    @property
    def image_seq_len(self) -> int:
        """Image tokens the transformer sees (the dynamic shift depends on it)."""
        raise NotImplementedError

    def sigma_spacing(self, num_steps: int) -> Optional[list[float]]:
        """The sigmas the pipeline passes before shifting (None: the scheduler's own spacing)."""
        return None

    def make_sampler(self, num_steps: int, sample: SampleConfig, *, reduce: str = "mean", backend: str = "auto",
                     stochasticity: Optional[float] = None) -> FlowSampler:
        sigmas = flow_sigmas(self.scheduler, num_steps, image_seq_len=self.image_seq_len,
                             sigmas=self.sigma_spacing(num_steps))
        noise_level = sample.noise_level if stochasticity is None else stochasticity
        return FlowSampler(sigmas, noise_level, sde_type=sample.sde_type, reduce=reduce, backend=backend,
                           device=self.device)

    @property
    def flow_cond_dim(self) -> Optional[int]:
        return self.denoiser.config.joint_attention_dim


class SD3Family(FlowMatchingFamily):
    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    t5_tokenizer_name = "tokenizer_3"

    def _latent_shape(self, resolution: Optional[int]) -> tuple[int, ...]:
        c = self.denoiser.config
        side = self._latent_side(c.sample_size, resolution, multiple=c.patch_size)
        return (c.in_channels, side, side)

    @property
    def image_seq_len(self) -> int:
        p = self.denoiser.config.patch_size
        return (self.latent_shape[1] // p) * (self.latent_shape[2] // p)

    def _encode(self, prompts: list[str]) -> Cond:
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompts, None, None, device=self._text_device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length)
        return Cond(embeds, pooled)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Optional[Cond], guidance: Optional[float] = None) -> torch.Tensor:
        return self.denoiser(hidden_states=x.to(self.dtype), timestep=t, encoder_hidden_states=cond.embeds,
                             pooled_projections=cond.pooled).sample
