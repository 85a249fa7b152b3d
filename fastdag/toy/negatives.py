"""Images that are not clean renders of the shapes world: the negatives of the realism output.

A classifier trained only on clean renders reads anything as whatever pays: a DAG run against such a reward
turned its samples into coloured noise that the classifier read as shapes (DESIGN.md §5). The realism output
("is this a clean render?") learns to refuse the cheap ways out, one type each:

- noise: random colour fields at a random grain (1 to 8 px per value), the "coloured noise" of hacked samples;
- blur: a render under a Gaussian blur of σ 1.8–4 px, well beyond the softness of the VAE's decodes that the
  classifiers' augmentation stands in for (a 3 × 3 binomial blur or a 2× down-and-up, σ ≲ 1 px);
- blobs: 1–4 soft Gaussian blobs of arbitrary colours on an arbitrary plain background;
- broken: a render damaged in one of four ways: its 8 × 8 tiles shuffled, a random rectangle replaced by noise,
  heavy additive noise (σ 0.15–0.4), or blended with a noise field (30–70%).

Samples from models that hacked a reward are the fifth type; they come from training runs, not from here.
Every function is seeded by its generator arguments and returns float32 [B, 3, RESOLUTION, RESOLUTION] in [0, 1].
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from fastdag.toy.world import RESOLUTION, sample_batch

NEGATIVE_TYPES: tuple[str, ...] = ("noise", "blur", "blobs", "broken")


def _uniform(generator: torch.Generator, low: float, high: float, *shape: int) -> torch.Tensor:
    return low + (high - low) * torch.rand(*shape, generator=generator)


def noise_fields(n: int, generator: torch.Generator) -> torch.Tensor:
    """n colour fields, each of uniform values on a grid of 4, 8, 16 or 32 cells a side, bilinearly upsampled."""
    out = torch.empty(n, 3, RESOLUTION, RESOLUTION)
    grids = (4, 8, 16, 32)
    for i in range(n):
        g = grids[int(torch.randint(len(grids), (1,), generator=generator))]
        field = torch.rand(1, 3, g, g, generator=generator)
        out[i] = F.interpolate(field, size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False)[0]
    return out


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-image σ in pixels (replicate padding). images [B, 3, H, W], sigma [B]."""
    radius = int(math.ceil(3 * float(sigma.max())))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32)  # [K]
    kernel = torch.exp(-0.5 * (taps / sigma.view(-1, 1)) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)  # [B, K]
    b, c, h, w = images.shape
    # Grouped convolution with one group per image channel, so each image gets its own σ.
    x = F.pad(images, (radius, radius, radius, radius), mode="replicate").reshape(1, b * c, h + 2 * radius, -1)
    k = kernel.repeat_interleave(c, dim=0)  # [B * C, K]
    x = F.conv2d(x, k.view(b * c, 1, 1, -1), groups=b * c)
    x = F.conv2d(x, k.view(b * c, 1, -1, 1), groups=b * c)
    return x.reshape(b, c, h, w)


def blurred(renders: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Renders under a Gaussian blur of σ uniform in [1.8, 4] px."""
    return gaussian_blur(renders, _uniform(generator, 1.8, 4.0, renders.shape[0])).clamp(0.0, 1.0)


def blobs(n: int, generator: torch.Generator) -> torch.Tensor:
    """1–4 soft Gaussian blobs (radius 2.5–9 px, any colour) over a plain background of any colour."""
    coords = torch.arange(RESOLUTION, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")  # [H, W]
    out = torch.rand(n, 3, 1, 1, generator=generator).expand(n, 3, RESOLUTION, RESOLUTION).clone()
    for i in range(n):
        for _ in range(int(torch.randint(1, 5, (1,), generator=generator))):
            cx, cy = _uniform(generator, 0.0, RESOLUTION, 2)
            radius = float(_uniform(generator, 2.5, 9.0, 1))
            alpha = torch.exp(-0.5 * ((xx - cx) ** 2 + (yy - cy) ** 2) / radius**2)  # [H, W]
            colour = torch.rand(3, 1, 1, generator=generator)
            out[i] = out[i] + alpha * (colour - out[i])
    return out


def broken(renders: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Renders damaged one way each, chosen uniformly: tiles shuffled, a rectangle of noise, heavy noise, or a
    blend with a noise field."""
    out = renders.clone()
    tile = RESOLUTION // 4
    for i in range(out.shape[0]):
        mode = int(torch.randint(4, (1,), generator=generator))
        if mode == 0:
            tiles = out[i].unfold(1, tile, tile).unfold(2, tile, tile).reshape(3, 16, tile, tile)
            # A permutation with no fixed point would be stricter; a random one moves ~15 of 16 tiles on average.
            tiles = tiles[:, torch.randperm(16, generator=generator)].reshape(3, 4, 4, tile, tile)
            out[i] = tiles.permute(0, 1, 3, 2, 4).reshape(3, RESOLUTION, RESOLUTION)
        elif mode == 1:
            h, w = (int(v) for v in torch.randint(10, 25, (2,), generator=generator))
            y, x = int(torch.randint(RESOLUTION - h + 1, (1,), generator=generator)), int(
                torch.randint(RESOLUTION - w + 1, (1,), generator=generator)
            )
            out[i, :, y : y + h, x : x + w] = torch.rand(3, h, w, generator=generator)
        elif mode == 2:
            sigma = float(_uniform(generator, 0.15, 0.4, 1))
            out[i] = out[i] + sigma * torch.randn(out[i].shape, generator=generator)
        else:
            alpha = float(_uniform(generator, 0.3, 0.7, 1))
            out[i] = out[i] + alpha * (noise_fields(1, generator)[0] - out[i])
    return out.clamp(0.0, 1.0)


def make_negatives(kind: str, n: int, rng: np.random.Generator, generator: torch.Generator) -> torch.Tensor:
    """n negatives of one type (NEGATIVE_TYPES); renders behind blur/broken are fresh world scenes from rng."""
    if kind == "noise":
        return noise_fields(n, generator)
    if kind == "blobs":
        return blobs(n, generator)
    if kind in ("blur", "broken"):
        renders = sample_batch(rng, n, exclude_heldout=False).images
        return blurred(renders, generator) if kind == "blur" else broken(renders, generator)
    raise ValueError(f"negative type must be one of {NEGATIVE_TYPES}, got {kind!r}")


def negative_batch(n_per_type: int, rng: np.random.Generator, generator: torch.Generator) -> torch.Tensor:
    """n_per_type negatives of each type, in NEGATIVE_TYPES order: float32 [len(NEGATIVE_TYPES) · n_per_type, 3, H, W]."""
    return torch.cat([make_negatives(kind, n_per_type, rng, generator) for kind in NEGATIVE_TYPES])
