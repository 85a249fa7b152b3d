"""The flow network F_φ(x_t, t, c): a UNet *encoder* with cross-attention, average-pooled to a scalar.

As the official code: encoder blocks (64, 128, 256, 256) with one ResNet layer each, cross-attention on the
prompt embedding, global average pool, linear -> scalar. Unconditional models get plain ResNet blocks.
The last layer starts at zero, so log F starts at the forward-looking term β·r̂ alone.
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

        channels = cfg.block_out_channels
        temb_dim = channels[0] * 4
        self.conv_in = nn.Conv2d(in_channels, channels[0], kernel_size=3, padding=1)
        self.time_proj = Timesteps(channels[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(channels[0], temb_dim)
        self.conditional = cross_attention_dim is not None
        block_type = "CrossAttnDownBlock2D" if self.conditional else "DownBlock2D"
        blocks = []
        prev = channels[0]
        for i, c in enumerate(channels):
            blocks.append(
                get_down_block(
                    block_type,
                    num_layers=cfg.layers_per_block,
                    in_channels=prev,
                    out_channels=c,
                    temb_channels=temb_dim,
                    add_downsample=i < len(channels) - 1,
                    resnet_eps=1e-5,
                    resnet_act_fn="silu",
                    resnet_groups=cfg.norm_num_groups,
                    cross_attention_dim=cross_attention_dim,
                    num_attention_heads=c // cfg.attention_head_dim,
                    attention_head_dim=cfg.attention_head_dim,
                    downsample_padding=1,
                )
            )
            prev = c
        self.down_blocks = nn.ModuleList(blocks)
        self.norm_out = nn.GroupNorm(cfg.norm_num_groups, prev)
        self.head = nn.Linear(prev, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, C, H, W], t [B] timesteps, cond [B, L, D] (conditional) -> log-flow [B] fp32."""
        temb = self.time_embedding(self.time_proj(t).to(x.dtype))
        h = self.conv_in(x)
        for block in self.down_blocks:
            if self.conditional:
                h, _ = block(h, temb, encoder_hidden_states=cond)
            else:
                h, _ = block(h, temb)
        h = nn.functional.silu(self.norm_out(h)).mean(dim=(2, 3))
        return self.head(h).squeeze(-1).float()
