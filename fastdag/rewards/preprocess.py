"""Image preprocessing of the CLIP/BLIP family on tensors, without a PIL round trip or torchvision.

The references resize the shorter side to ``size`` (bicubic, antialiased), centre-crop ``size`` x ``size`` and
normalise with the OpenAI CLIP mean/std; this is the same on float tensors, batched, on the reward's device.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """float [B, 3, H, W] in [0, 1] -> [B, 3, size, size]: shorter side to ``size``, then the centre crop."""
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        images = F.interpolate(images, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
        images = images.clamp(0, 1)  # bicubic overshoots; the references resize 8-bit images, which clip
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))  # torchvision's CenterCrop
    return images[..., top : top + size, left : left + size]


def normalize(images: torch.Tensor, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


def clip_pixels(images: torch.Tensor, size: int, device: torch.device) -> torch.Tensor:
    """float [B, 3, H, W] in [0, 1] -> the models' pixel_values: fp32 [B, 3, size, size] on ``device``."""
    x = images.detach().to(device=device, dtype=torch.float32)
    return normalize(resize_center_crop(x, size))
