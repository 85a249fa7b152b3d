"""The paper's toy kind: an unconditional pixel-space ``UNet2DModel`` in a ``DDPMPipeline`` (CIFAR-10 DDPM), sampled
with DDIM. No prompt, no CFG, no VAE. DDPMPipeline has no diffusers LoRA loader: the adapter is saved as a peft state
dict (``pytorch_lora_weights.safetensors``), loaded with ``peft.set_peft_model_state_dict``."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from fastdag.families.base import Cond
from fastdag.families.sd import UNetDDIMFamily


class DDPMFamily(UNetDDIMFamily):
    name = "ddpm"
    pipeline_class = "DDPMPipeline"
    text_encoder_names = ()
    lora_key_conversion = False

    def frozen_modules(self) -> list[torch.nn.Module]:
        return []

    def _latent_shape(self, resolution: Optional[int]) -> tuple[int, ...]:
        size = self.denoiser.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (self.denoiser.config.in_channels, resolution or h, resolution or w)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Optional[Cond], guidance: Optional[float] = None) -> torch.Tensor:
        return self.denoiser(x.to(self.dtype), t).sample

    @torch.no_grad()
    def decode(self, x: torch.Tensor, cheap: bool = False) -> torch.Tensor:
        return (x.float() / 2 + 0.5).clamp(0, 1)  # pixels in [-1, 1]

    def save_lora(self, directory: Path) -> None:
        from safetensors.torch import save_file

        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.lora_state_dict().items()}
        directory.mkdir(parents=True, exist_ok=True)
        save_file(state, str(directory / "pytorch_lora_weights.safetensors"))

    def lora_from_file(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return state
