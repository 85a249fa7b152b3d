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

- hacked: samples of a model that hacked a reward, from a bank collected from training runs
  (`fastdag/assets/hacked_samples.png`, how it was made in `hacked_samples.json`; `python -m
  fastdag.toy.hacked_bank` rebuilds it from a run's checkpoint). Its train split teaches the reward's classifier;
  its held-out split (samples for other prompts) measures it. The judge does not train on it: it stays the
  independent check of what the reward's classifier learned (HACKED_TYPES vs NEGATIVE_TYPES).

Every function is seeded by its generator arguments and returns float32 [B, 3, RESOLUTION, RESOLUTION] in [0, 1].
"""
from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
from PIL import Image
import torch
import torch.nn.functional as F

from fastdag.toy.world import RESOLUTION, sample_batch

NEGATIVE_TYPES: tuple[str, ...] = ("noise", "blur", "blobs", "broken")
# The reward classifier's negatives: the synthetic ones and the bank of hacked samples.
HACKED_TYPES: tuple[str, ...] = (*NEGATIVE_TYPES, "hacked")
HACKED_BANK = Path(__file__).resolve().parents[1] / "assets" / "hacked_samples.png"


def save_bank(images: torch.Tensor, split: Sequence[str], path: Path, provenance: dict) -> None:
    """Writes uint8 images [N, 3, R, R] as one PNG row of tiles (lossless, small) and a JSON beside it with
    each image's split ("train" / "heldout") and `provenance` (how the images were made)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or len(split) != images.shape[0]:
        raise ValueError(f"need uint8 [N, 3, R, R] and N splits, got {images.dtype} {tuple(images.shape)}, {len(split)}")
    n, _, r, _ = images.shape
    strip = images.permute(2, 0, 3, 1).reshape(r, n * r, 3).numpy()  # [R, N·R, 3]
    Image.fromarray(strip).save(path, optimize=True)
    path.with_suffix(".json").write_text(json.dumps({**provenance, "split": list(split)}, indent=1) + "\n")


@lru_cache(maxsize=4)
def hacked_bank(split: Literal["train", "heldout"], path: Path = HACKED_BANK) -> torch.Tensor:
    """The bank's images of one split, float32 [N, 3, R, R] in [0, 1]. FileNotFoundError if it is not there."""
    strip = torch.from_numpy(np.array(Image.open(path).convert("RGB")))  # [R, N·R, 3]
    r = strip.shape[0]
    images = strip.reshape(r, -1, r, 3).permute(1, 3, 0, 2).float() / 255.0
    splits = json.loads(path.with_suffix(".json").read_text())["split"]
    keep = torch.tensor([s == split for s in splits])
    if len(splits) != images.shape[0] or not keep.any():
        raise ValueError(f"{path}: {images.shape[0]} images, {len(splits)} split labels, none {split!r}")
    return images[keep]


def hacked(n: int, generator: torch.Generator, split: Literal["train", "heldout"] = "train") -> torch.Tensor:
    """n images drawn from the bank's split, each flipped left-right with probability 1/2."""
    bank = hacked_bank(split)
    out = bank[torch.randint(bank.shape[0], (n,), generator=generator)]
    flip = torch.rand(n, generator=generator) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), out.flip(-1), out)


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


def make_negatives(
    kind: str, n: int, rng: np.random.Generator, generator: torch.Generator, split: Literal["train", "heldout"] = "train"
) -> torch.Tensor:
    """n negatives of one type (HACKED_TYPES); renders behind blur/broken are fresh world scenes from rng; split:
    which part of the hacked bank to draw from."""
    if kind == "hacked":
        return hacked(n, generator, split)
    if kind == "noise":
        return noise_fields(n, generator)
    if kind == "blobs":
        return blobs(n, generator)
    if kind in ("blur", "broken"):
        renders = sample_batch(rng, n, exclude_heldout=False).images
        return blurred(renders, generator) if kind == "blur" else broken(renders, generator)
    raise ValueError(f"negative type must be one of {HACKED_TYPES}, got {kind!r}")


def negative_batch(
    n_per_type: int, rng: np.random.Generator, generator: torch.Generator, types: Sequence[str] = NEGATIVE_TYPES
) -> torch.Tensor:
    """n_per_type negatives of each type, in `types` order: float32 [len(types) · n_per_type, 3, H, W]."""
    return torch.cat([make_negatives(kind, n_per_type, rng, generator) for kind in types])
