"""The flow network F_φ(x_t, t, c): a UNet *encoder* with cross-attention on the prompt, pooled to a scalar.

``dag.flow.architecture: official`` is the official code's ``ConditionalFlow`` (alignment/flow.py, built in
train_gfn.py with block_out_channels (64, 128, 256, 256), layers_per_block 1, cross_attention_dim 768):
timestep embedding (dim 4·C_0), conv_in, down blocks ``CrossAttnDownBlock2D`` × (n−1) then ``DownBlock2D``, every
one downsampling (SD's 64×64 latents end at 4×4), 8 attention heads, GroupNorm 32 groups, eps 1e-5; then
``AvgPool2d(4)`` and ``Linear(C, 1)`` with PyTorch's default init. The pool here is a global average over the
last map: the same as AvgPool2d(4) on SD's 4×4 map, and defined for any latent size (the tiny models' 8×8 end at
1×1). ``compact`` is fastdag's first design, kept as a switch: cross-attention in every block, no downsample after
the last, GroupNorm + SiLU before a zero-initialised linear head (log F starts at the β·r̂ term alone).
Unconditional models get plain ResNet blocks in either.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fastdag.config import FlowConfig


class FlowNetwork(nn.Module):
    def __init__(self, in_channels: int, cfg: FlowConfig, cross_attention_dim: Optional[int] = None):
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps
        from diffusers.models.unets.unet_2d_blocks import get_down_block

        official = cfg.architecture == "official"
        channels = cfg.block_out_channels
        temb_dim = channels[0] * 4
        self.conv_in = nn.Conv2d(in_channels, channels[0], kernel_size=3, padding=1)
        self.time_proj = Timesteps(channels[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(channels[0], temb_dim)
        self.conditional = cross_attention_dim is not None
        blocks = []
        prev = channels[0]
        for i, c in enumerate(channels):
            last = i == len(channels) - 1
            cross = self.conditional and not (official and last)
            blocks.append(
                get_down_block(
                    "CrossAttnDownBlock2D" if cross else "DownBlock2D",
                    num_layers=cfg.layers_per_block,
                    in_channels=prev,
                    out_channels=c,
                    temb_channels=temb_dim,
                    add_downsample=official or not last,
                    resnet_eps=1e-5,
                    resnet_act_fn="silu",
                    resnet_groups=cfg.norm_num_groups,
                    cross_attention_dim=cross_attention_dim,
                    num_attention_heads=cfg.attention_heads,
                    attention_head_dim=c // cfg.attention_heads,
                    downsample_padding=1,
                )
            )
            prev = c
        self.down_blocks = nn.ModuleList(blocks)
        self.norm_out = None if official else nn.GroupNorm(cfg.norm_num_groups, prev)
        self.head = nn.Linear(prev, 1)
        if not official:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, C, H, W], t [B] timesteps, cond [B, L, D] (conditional) -> log-flow [B] fp32."""
        temb = self.time_embedding(self.time_proj(t).to(self.conv_in.weight.dtype))
        h = self.conv_in(x)
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, _ = block(h, temb, encoder_hidden_states=cond)
            else:
                h, _ = block(h, temb)
        if self.norm_out is not None:
            h = nn.functional.silu(self.norm_out(h))
        return self.head(h.mean(dim=(2, 3))).squeeze(-1).float()
