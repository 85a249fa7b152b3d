"""Black-box rewards: a protocol, a registry by name, and the paper's JPEG (in)compressibility.

A reward maps images float [B, 3, H, W] in [0, 1] and their prompts to a float tensor [B]. Rewards run on the
host or device as they like; the trainer checks every result (shape, finiteness) and stops the run with a
message naming the reward if one misbehaves.
"""
from __future__ import annotations

import io
from typing import Any, Callable, Optional, Protocol, Sequence

import numpy as np
import torch
from PIL import Image

from fastdag.config import ConfigError
from fastdag.errors import short_repr


class RewardFn(Protocol):
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """images float [B, 3, H, W] in [0, 1]; prompts, B strings -> rewards float [B]."""


class RewardError(RuntimeError):
    """A reward returned something unusable; the message names the reward and what it returned."""


REWARDS: dict[str, Callable[..., RewardFn]] = {}


def register_reward(name: str):
    """Decorator: ``@register_reward("name")`` on a factory (class or function) taking the config's kwargs."""

    def deco(factory):
        REWARDS[name] = factory
        return factory

    return deco


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """float [B, 3, H, W] in [0, 1] -> uint8 [B, H, W, 3] (round to nearest)."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Size of each image saved as JPEG at ``quality``, in kB (1000 bytes), as the paper and DDPO. [B] fp32."""
    sizes = []
    for img in to_uint8_hwc(images):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32)


def _jpeg_quality(quality: Any) -> int:
    """reward.kwargs.quality as PIL's JPEG encoder takes it, checked before any model loads."""
    if isinstance(quality, bool) or not isinstance(quality, int) or not 0 <= quality <= 100:
        raise ConfigError(f"reward.kwargs.quality: must be an integer in [0, 100] (JPEG quality), got {quality!r}")
    return quality


@register_reward("jpeg_compressibility")
class JpegCompressibility:
    """r = −(JPEG size in kB at quality 95): higher for images that compress well."""

    def __init__(self, quality: int = 95):
        self.quality = _jpeg_quality(quality)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return -jpeg_size_kb(images, self.quality)


@register_reward("jpeg_incompressibility")
class JpegIncompressibility:
    """r = +(JPEG size in kB at quality 95): higher for images that compress badly."""

    def __init__(self, quality: int = 95):
        self.quality = _jpeg_quality(quality)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return jpeg_size_kb(images, self.quality)


@register_reward("brightness")
class Brightness:
    """r = mean pixel value in [0, 1]. Smooth and cheap: for tests and debugging the math, not for papers."""

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return images.detach().float().mean(dim=(1, 2, 3)).cpu()


@register_reward("shapes_alignment")
def _shapes_alignment(**kwargs: Any) -> RewardFn:
    """The shapes world's prompt alignment: mean log-probability of the prompt's attributes (fastdag.toy)."""
    from fastdag.toy.reward import ShapesAlignmentReward

    return ShapesAlignmentReward(**kwargs)


@register_reward("shapes_aesthetic")
def _shapes_aesthetic(**kwargs: Any) -> RewardFn:
    """The shapes world's aesthetic task: a taste over unstated attributes (a white background), the stated
    attributes and realism, as log-probabilities (fastdag.toy)."""
    from fastdag.toy.reward import ShapesAestheticReward

    return ShapesAestheticReward(**kwargs)


# Metrics reported in evaluations: name -> factory of a callable (images, prompts) -> {name: float tensor [B]}.
METRICS: dict[str, Callable[[], Callable[..., dict[str, torch.Tensor]]]] = {}


def _shapes_accuracy_metric() -> Callable[..., dict[str, torch.Tensor]]:
    from fastdag.toy.reward import shapes_attribute_accuracy

    def metric(images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        acc = shapes_attribute_accuracy(images, prompts)
        return {"shapes_accuracy" if k == "all" else f"{k}_accuracy": v for k, v in acc.items()}

    return metric


METRICS["shapes_accuracy"] = _shapes_accuracy_metric


def _shapes_judge_metric() -> Callable[..., dict[str, torch.Tensor]]:
    # The independent judge (fastdag.toy.judge): evaluation only, never a training reward. NaN = not stated.
    from fastdag.toy.judge import JudgeMetric

    return JudgeMetric()


METRICS["shapes_judge"] = _shapes_judge_metric


def _clip_diversity_metric(**kwargs: Any) -> Callable[..., dict[str, torch.Tensor]]:
    # Diversity of a model's samples per prompt (SD models): mean pairwise cosine distance of CLIP embeddings.
    from fastdag.rewards.diversity import ClipDiversity

    return ClipDiversity(**kwargs)


METRICS["clip_diversity"] = _clip_diversity_metric


def build_metric(name: str, kwargs: Optional[dict[str, Any]] = None) -> Callable[..., dict[str, torch.Tensor]]:
    if name not in METRICS:
        raise ConfigError(f"eval.metric: unknown metric {name!r}; registered: {', '.join(sorted(METRICS))}")
    try:
        return METRICS[name](**(kwargs or {}))
    except TypeError as e:
        raise ConfigError(f"eval.metric_kwargs: {name} does not take {sorted(kwargs or {})} ({e})") from None


def build_reward(name: str, kwargs: dict[str, Any]) -> RewardFn:
    if name not in REWARDS:
        raise ConfigError(f"reward.name: unknown reward {name!r}; registered: {', '.join(sorted(REWARDS))}")
    try:
        return REWARDS[name](**kwargs)
    except TypeError as e:
        raise ConfigError(f"reward.kwargs: {name} does not accept {short_repr(kwargs)} ({e})") from None


class CheckedReward:
    """Calls a reward in batches and checks its output: float [B], finite; else :class:`RewardError`."""

    def __init__(self, name: str, fn: RewardFn, batch_size: int):
        self.name, self.fn, self.batch_size = name, fn, batch_size

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """images [N, 3, H, W] in [0, 1]; returns rewards [N] fp32 on the CPU."""
        out = []
        for i in range(0, images.shape[0], self.batch_size):
            chunk, chunk_prompts = images[i : i + self.batch_size], list(prompts[i : i + self.batch_size])
            r = call_reward(self.name, self.fn, chunk, chunk_prompts)
            if r.shape != (chunk.shape[0],):
                raise RewardError(
                    f"reward {self.name!r} returned shape {tuple(r.shape)} for {chunk.shape[0]} images; "
                    f"expected ({chunk.shape[0]},)"
                )
            r = r.detach().to("cpu", torch.float32)
            if not torch.isfinite(r).all():
                bad = r[~torch.isfinite(r)].tolist()[:4]
                raise RewardError(f"reward {self.name!r} returned non-finite values {bad}")
            out.append(r)
        return torch.cat(out)


def call_reward(name: str, fn: RewardFn, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """``fn(images, prompts)`` as a numeric tensor. The reward's own exception becomes a one-line RewardError naming
    the reward and the exception, its traceback kept in ``.details`` (the CLI writes it to the run's error.log);
    an output that is not numbers (None, strings, objects) is a RewardError saying what came back."""
    import traceback

    try:
        r = fn(images, prompts)
    except Exception as e:  # noqa: BLE001 - any failure of user code is reported, not re-raised as a traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        err = RewardError(f"reward {name!r} raised {type(e).__name__}" + (f": {first}" if first else ""))
        err.details = traceback.format_exc()
        raise err from None
    if not isinstance(r, torch.Tensor):
        try:
            arr = np.asarray(r)
        except Exception:  # noqa: BLE001 - ragged or exotic objects
            arr = np.asarray(None)
        if arr.dtype.kind not in "biuf":
            what = repr(r) if len(repr(r)) <= 60 else repr(r)[:57] + "..."
            raise RewardError(f"reward {name!r} returned {type(r).__name__} {what}, not numbers; "
                              f"expected a float tensor [{images.shape[0]}]")
        r = torch.as_tensor(arr)
    if r.is_complex():
        raise RewardError(f"reward {name!r} returned complex numbers; expected a float tensor [{images.shape[0]}]")
    return r


# The model rewards, each in its own module; importing them only registers them (transformers loads on first use).
from fastdag.rewards import hpsv2, imagereward, laion_aesthetic, pickscore, remote  # noqa: E402,F401
