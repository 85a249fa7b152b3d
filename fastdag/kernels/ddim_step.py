"""One DDIM step with the log-densities of the forward policy and of the fixed backward (noising) policy.

Notation (DESIGN.md §1, diffusers' ``DDIMScheduler.step``):

==============  =======================================================
``alpha_t``     ᾱ_t, cumulative alpha product at the current timestep
``alpha_prev``  ᾱ_{t-1}, at the previous timestep (``final_alpha_cumprod`` at the last step)
``eps``         the (CFG-combined) model output o in the scheduler's ``prediction_type``: ε̂ (epsilon), v̂
                (v_prediction) or x̂_0 itself (sample)
``x0_pred``     x̂_0: (x_t − √(1−ᾱ_t) o) / √ᾱ_t (epsilon), √ᾱ_t x_t − √(1−ᾱ_t) o (v), o (sample); then clipped to
                ±``clip_sample_range`` when the scheduler has ``clip_sample``
``pred_eps``    ε̂: o (epsilon), √ᾱ_t o + √(1−ᾱ_t) x_t (v), (x_t − √ᾱ_t o) / √(1−ᾱ_t) (sample); from the
                *unclipped* x̂_0, as ``DDIMScheduler.step`` with its default ``use_clipped_model_output=False``
``sigma``       σ_t = η √((1−ᾱ_{t−1})/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_{t−1})
``mean``        μ_θ = √ᾱ_{t−1} x̂_0 + √(1 − ᾱ_{t−1} − σ_t²) ε̂
``log_pf``      log N(x_{t−1}; μ_θ, σ_t² I)                  forward policy p_θ(x_{t−1} | x_t)
``log_pb``      log N(x_t; √(ᾱ_t/ᾱ_{t−1}) x_{t−1}, (1 − ᾱ_t/ᾱ_{t−1}) I)   backward policy q(x_t | x_{t−1})
==============  =======================================================

Both log-densities are reduced over the non-batch dimensions by ``mean`` (the official code's choice, inherited
from DDPO: β then acts like β·D against a true density ratio) or ``sum`` (the true log-density).

Dynamic thresholding (``thresholding=True``) needs a per-sample quantile of |x̂_0| and is refused when a model is
loaded (``fastdag.samplers.ddim.step_settings``), as is any other prediction type.

A step whose σ is zero (η = 0, or ᾱ_{t−1} = ᾱ_t) is deterministic and has no density: its ``log_pf`` is defined
as 0 with no gradient, and likewise ``log_pb`` where the backward variance is zero. Nothing becomes inf or NaN.

This file holds the PyTorch reference (``ddim_step_reference``, the single source of truth) and its fused Triton
twin (``ddim_step_triton``) with the same signature; ``fastdag.kernels.dispatch.ddim_step`` picks one.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import torch

from fastdag.kernels._compat import require_triton, tl, triton

REDUCTIONS = ("mean", "sum")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


class DDIMStepOutput(NamedTuple):
    """``x_prev`` and ``x0_pred`` have the shape of ``x_t``; ``log_pf`` and ``log_pb`` are [B] fp32."""

    x_prev: torch.Tensor
    log_pf: torch.Tensor
    log_pb: torch.Tensor
    x0_pred: torch.Tensor


def _per_sample(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, 1, ...] broadcastable against ``like``, fp32."""
    return a.to(torch.float32).reshape(-1, *([1] * (like.dim() - 1)))


def _gaussian_log_density(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, reduce: str) -> torch.Tensor:
    """Per-sample reduced log N(x; mean, std²); 0 where std == 0 (a deterministic transition)."""
    positive = std > 0
    safe_std = torch.where(positive, std, torch.ones_like(std))
    elementwise = -((x - mean) ** 2) / (2 * safe_std**2) - torch.log(safe_std) - _LOG_SQRT_2PI
    elementwise = torch.where(positive, elementwise, torch.zeros_like(elementwise))
    dims = tuple(range(1, x.dim()))
    return elementwise.mean(dim=dims) if reduce == "mean" else elementwise.sum(dim=dims)


def predict_x0_eps(
    model_output: torch.Tensor, x_t: torch.Tensor, alpha_t: torch.Tensor, prediction_type: str = "epsilon"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂_0, ε̂) in fp32 from a model output [B, ...] in ``prediction_type`` and ᾱ_t [B] (or broadcastable);
    unclipped (``DDIMScheduler.step`` step 3)."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    o, x = model_output.to(torch.float32), x_t.to(torch.float32)
    a_t = alpha_t.to(torch.float32)
    a_t = a_t.reshape(-1, *([1] * (x.dim() - 1))) if a_t.dim() == 1 else a_t
    sqrt_a, sqrt_1ma = torch.sqrt(a_t), torch.sqrt(1 - a_t)
    if prediction_type == "epsilon":
        return (x - sqrt_1ma * o) / sqrt_a, o
    if prediction_type == "v_prediction":
        return sqrt_a * x - sqrt_1ma * o, sqrt_a * o + sqrt_1ma * x
    return o, (x - sqrt_a * o) / sqrt_1ma


def ddim_step_reference(
    eps: torch.Tensor,
    x_t: torch.Tensor,
    alpha_t: torch.Tensor,
    alpha_prev: torch.Tensor,
    eta: float,
    x_prev: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
    reduce: str = "mean",
    prediction_type: str = "epsilon",
    clip_sample_range: Optional[float] = None,
) -> DDIMStepOutput:
    """One DDIM step x_t -> x_{t-1} with log p_F and log p_B, computed in fp32.

    Args:
        eps: [B, ...] model output in ``prediction_type`` (ε̂ for SD 1.5; carries θ, gradients flow through it).
        x_t: [B, ...] current state.
        alpha_t, alpha_prev: [B] ᾱ_t and ᾱ_{t-1} per sample (samples may sit at different timesteps).
        eta: DDIM η (1 in the paper: the full DDPM variance).
        x_prev: [B, ...] a stored next state to score (training); None samples x_{t-1} = μ + σ·noise (rollout).
        noise: [B, ...] standard normal noise used when sampling; drawn with ``torch.randn_like`` if None.
        reduce: ``mean`` or ``sum`` over the non-batch dimensions.
        prediction_type: the scheduler's ``prediction_type``: epsilon, v_prediction or sample.
        clip_sample_range: clip x̂_0 to ±this (the scheduler's ``clip_sample``/``clip_sample_range``); None: no clip.

    Returns:
        DDIMStepOutput(x_prev [B, ...] in x_t's dtype, log_pf [B], log_pb [B], x0_pred [B, ...] (clipped) in x_t's
        dtype).
        A given ``x_prev`` is returned as is and treated as data (no gradient).
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    out_dtype = x_t.dtype
    x_t32 = x_t.to(torch.float32)
    a_t, a_prev = _per_sample(alpha_t, x_t), _per_sample(alpha_prev, x_t)

    # x̂_0, ε̂ (DDIM paper Eq. 12; diffusers' prediction types), the clip of x̂_0, and σ_t (Eq. 16).
    x0_pred, eps32 = predict_x0_eps(eps, x_t32, a_t, prediction_type)
    if clip_sample_range is not None:
        x0_pred = x0_pred.clamp(-clip_sample_range, clip_sample_range)
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    sigma = eta * torch.sqrt(variance.clamp_min(0))
    # μ_θ: "direction pointing to x_t" plus the rescaled x̂_0.
    mean = torch.sqrt(a_prev) * x0_pred + torch.sqrt((1 - a_prev - sigma**2).clamp_min(0)) * eps32

    if x_prev is None:
        if noise is None:
            noise = torch.randn_like(x_t32)
        x_prev32 = (mean + sigma * noise.to(torch.float32)).detach()
        x_prev_out = x_prev32.to(out_dtype)
    else:
        x_prev32 = x_prev.detach().to(torch.float32)
        x_prev_out = x_prev

    log_pf = _gaussian_log_density(x_prev32, mean, sigma, reduce)
    # Backward (noising) kernel q(x_t | x_{t-1}); it has no parameters.
    ratio = a_t / a_prev
    log_pb = _gaussian_log_density(
        x_t32, torch.sqrt(ratio) * x_prev32, torch.sqrt((1 - ratio).clamp_min(0)), reduce
    )
    return DDIMStepOutput(x_prev_out, log_pf, log_pb, x0_pred.to(out_dtype))


# Fused Triton twin: one pass over eps, x_t and x_prev (scoring) or noise (sampling).
#
# Forward: grid (B, n_blocks). Program (b, k) writes x0_pred (and the sampled x_prev) for elements
# [k·BLOCK, (k+1)·BLOCK) of sample b, and the block's sums of squared residuals (x_{t−1} − μ)² and
# (x_t − √(ᾱ_t/ᾱ_{t−1}) x_{t−1})² to two [B, n_blocks] fp32 buffers. A second launch, one program per sample, sums
# each row in a fixed order (deterministic, no atomics) and adds the closed-form constants of the Gaussian.
_BLOCK_SIZE = 1024
_NUM_WARPS = 4
_MAX_PARTIALS_BLOCK = 1024
_LOG_SQRT_2PI_TL = tl.constexpr(_LOG_SQRT_2PI)


@triton.jit
def _ddim_coefficients(alpha_t, alpha_prev, eta):
    """Per-sample fp32 scalars of one step, written as in ``ddim_step_reference`` so both round alike."""
    sqrt_alpha_t = tl.sqrt(alpha_t)
    sqrt_one_minus_alpha_t = tl.sqrt(1.0 - alpha_t)
    variance = (1.0 - alpha_prev) / (1.0 - alpha_t) * (1.0 - alpha_t / alpha_prev)
    sigma = eta * tl.sqrt(tl.maximum(variance, 0.0))
    # Coefficient of ε̂ in μ_θ ("direction pointing to x_t").
    direction = tl.sqrt(tl.maximum(1.0 - alpha_prev - sigma * sigma, 0.0))
    ratio = alpha_t / alpha_prev
    sqrt_ratio = tl.sqrt(ratio)
    std_pb = tl.sqrt(tl.maximum(1.0 - ratio, 0.0))
    return sqrt_alpha_t, sqrt_one_minus_alpha_t, tl.sqrt(alpha_prev), direction, sigma, sqrt_ratio, std_pb


@triton.jit
def _predict_x0_eps(output, x_t, sqrt_alpha_t, sqrt_one_minus_alpha_t, clip_range, PREDICTION: tl.constexpr,
                    CLIP: tl.constexpr):
    """(x̂_0 clipped, ε̂, ∂x̂_0/∂o, ∂ε̂/∂o) elementwise from the model output o, as ``predict_x0_eps`` plus the clip.
    PREDICTION: 0 epsilon, 1 v_prediction, 2 sample. ∂x̂_0/∂o is 0 where the clip is active (as torch.clamp's)."""
    if PREDICTION == 0:
        x0 = (x_t - sqrt_one_minus_alpha_t * output) / sqrt_alpha_t
        eps = output
        d_x0 = -sqrt_one_minus_alpha_t / sqrt_alpha_t
        d_eps = 1.0
    elif PREDICTION == 1:
        x0 = sqrt_alpha_t * x_t - sqrt_one_minus_alpha_t * output
        eps = sqrt_alpha_t * output + sqrt_one_minus_alpha_t * x_t
        d_x0 = -sqrt_one_minus_alpha_t
        d_eps = sqrt_alpha_t
    else:
        x0 = output
        eps = (x_t - sqrt_alpha_t * output) / sqrt_one_minus_alpha_t
        d_x0 = 1.0
        d_eps = -sqrt_alpha_t / sqrt_one_minus_alpha_t
    d_x0 = output * 0.0 + d_x0  # elementwise from here on
    if CLIP:
        inside = (x0 >= -clip_range) & (x0 <= clip_range)
        d_x0 = tl.where(inside, d_x0, 0.0)
        x0 = tl.minimum(tl.maximum(x0, -clip_range), clip_range)
    return x0, eps, d_x0, d_eps


@triton.jit
def _reduced_gaussian_log_density(sum_sq, std, n_elements, MEAN: tl.constexpr):
    """Σ_i log N(x_i; μ_i, std²) from Σ_i (x_i − μ_i)² (÷ n_elements when MEAN); 0 where std == 0."""
    positive = std > 0.0
    safe_std = tl.where(positive, std, 1.0)
    # `* 1.0` rather than .to(fp32): an int argument equal to 1 is specialised to a constexpr, which has no .to.
    n = n_elements * 1.0
    quadratic = -sum_sq / (2.0 * safe_std * safe_std)
    constant = tl.log(safe_std) + _LOG_SQRT_2PI_TL
    if MEAN:
        total = quadratic / n - constant
    else:
        total = quadratic - n * constant
    return tl.where(positive, total, 0.0)


@triton.jit
def _ddim_step_forward_kernel(
    eps_ptr,
    x_t_ptr,
    target_ptr,  # x_{t−1} to score, or the standard normal noise when SAMPLING
    alpha_t_ptr,
    alpha_prev_ptr,
    eta,
    clip_range,
    x_prev_out_ptr,  # written only when SAMPLING
    x0_pred_ptr,
    sq_pf_ptr,  # [B, n_blocks] fp32 partial Σ (x_{t−1} − μ)²
    sq_pb_ptr,  # [B, n_blocks] fp32 partial Σ (x_t − √ratio · x_{t−1})²
    n_elements,
    n_blocks,
    SAMPLING: tl.constexpr,
    PREDICTION: tl.constexpr,
    CLIP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    sample = tl.program_id(0)
    block = tl.program_id(1)
    alpha_t = tl.load(alpha_t_ptr + sample)
    alpha_prev = tl.load(alpha_prev_ptr + sample)
    sqrt_alpha_t, sqrt_one_minus_alpha_t, sqrt_alpha_prev, direction, sigma, sqrt_ratio, std_pb = _ddim_coefficients(
        alpha_t, alpha_prev, eta
    )

    offsets = block * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    # int64 row offset: B · D can pass 2³¹ at large batch × resolution.
    row = sample.to(tl.int64) * n_elements
    # Load, upcast, compute in fp32, downcast on store (the interpreter miscomputes bf16 arithmetic).
    output = tl.load(eps_ptr + row + offsets, mask=mask, other=0.0).to(tl.float32)
    x_t = tl.load(x_t_ptr + row + offsets, mask=mask, other=0.0).to(tl.float32)

    x0_pred, eps, _, _ = _predict_x0_eps(output, x_t, sqrt_alpha_t, sqrt_one_minus_alpha_t, clip_range, PREDICTION, CLIP)
    mean = sqrt_alpha_prev * x0_pred + direction * eps
    if SAMPLING:
        noise = tl.load(target_ptr + row + offsets, mask=mask, other=0.0).to(tl.float32)
        x_prev = mean + sigma * noise
        tl.store(x_prev_out_ptr + row + offsets, x_prev.to(x_prev_out_ptr.dtype.element_ty), mask=mask)
    else:
        x_prev = tl.load(target_ptr + row + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(x0_pred_ptr + row + offsets, x0_pred.to(x0_pred_ptr.dtype.element_ty), mask=mask)

    # Both densities use the fp32 x_{t−1}, before any downcast, like the reference.
    diff_pf = tl.where(mask, x_prev - mean, 0.0)
    diff_pb = tl.where(mask, x_t - sqrt_ratio * x_prev, 0.0)
    partial = sample * n_blocks + block
    tl.store(sq_pf_ptr + partial, tl.sum(diff_pf * diff_pf, axis=0))
    tl.store(sq_pb_ptr + partial, tl.sum(diff_pb * diff_pb, axis=0))


@triton.jit
def _ddim_step_reduce_kernel(
    sq_pf_ptr,
    sq_pb_ptr,
    alpha_t_ptr,
    alpha_prev_ptr,
    eta,
    log_pf_ptr,  # [B] fp32
    log_pb_ptr,  # [B] fp32
    n_elements,
    n_blocks,
    MEAN: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    sample = tl.program_id(0)
    alpha_t = tl.load(alpha_t_ptr + sample)
    alpha_prev = tl.load(alpha_prev_ptr + sample)
    _, _, _, _, sigma, _, std_pb = _ddim_coefficients(alpha_t, alpha_prev, eta)

    # Fixed traversal order over the row of partials: the result does not depend on scheduling.
    acc_pf = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    acc_pb = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    for start in range(0, n_blocks, BLOCK_SIZE):
        offsets = start + tl.arange(0, BLOCK_SIZE)
        mask = offsets < n_blocks
        acc_pf += tl.load(sq_pf_ptr + sample * n_blocks + offsets, mask=mask, other=0.0)
        acc_pb += tl.load(sq_pb_ptr + sample * n_blocks + offsets, mask=mask, other=0.0)
    log_pf = _reduced_gaussian_log_density(tl.sum(acc_pf, axis=0), sigma, n_elements, MEAN)
    log_pb = _reduced_gaussian_log_density(tl.sum(acc_pb, axis=0), std_pb, n_elements, MEAN)
    tl.store(log_pf_ptr + sample, log_pf)
    tl.store(log_pb_ptr + sample, log_pb)


@triton.jit
def _ddim_step_backward_kernel(
    eps_ptr,
    x_t_ptr,
    target_ptr,  # x_{t−1} that was scored, or the noise that was used when SAMPLING
    alpha_t_ptr,
    alpha_prev_ptr,
    eta,
    clip_range,
    grad_x0_pred_ptr,  # [B, D] upstream gradient of x0_pred (read only when HAS_GRAD_X0)
    grad_log_pf_ptr,  # [B] upstream gradient of log_pf (read only when HAS_GRAD_LOG_PF)
    grad_eps_ptr,  # [B, D] in eps's dtype
    n_elements,
    SAMPLING: tl.constexpr,
    PREDICTION: tl.constexpr,
    CLIP: tl.constexpr,
    MEAN: tl.constexpr,
    HAS_GRAD_X0: tl.constexpr,
    HAS_GRAD_LOG_PF: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    sample = tl.program_id(0)
    block = tl.program_id(1)
    alpha_t = tl.load(alpha_t_ptr + sample)
    alpha_prev = tl.load(alpha_prev_ptr + sample)
    sqrt_alpha_t, sqrt_one_minus_alpha_t, sqrt_alpha_prev, direction, sigma, _, _ = _ddim_coefficients(
        alpha_t, alpha_prev, eta
    )
    offsets = block * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    row = sample.to(tl.int64) * n_elements
    # Recompute x̂_0, ε̂ and μ exactly as the forward did (and the sampled x_{t−1} in fp32), rather than storing them.
    output = tl.load(eps_ptr + row + offsets, mask=mask, other=0.0).to(tl.float32)
    x_t = tl.load(x_t_ptr + row + offsets, mask=mask, other=0.0).to(tl.float32)
    x0_pred, eps, d_x0, d_eps = _predict_x0_eps(
        output, x_t, sqrt_alpha_t, sqrt_one_minus_alpha_t, clip_range, PREDICTION, CLIP
    )
    grad_eps = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    if HAS_GRAD_X0:
        grad_x0 = tl.load(grad_x0_pred_ptr + row + offsets, mask=mask, other=0.0).to(tl.float32)
        grad_eps += grad_x0 * d_x0
    if HAS_GRAD_LOG_PF:
        mean = sqrt_alpha_prev * x0_pred + direction * eps
        d_mean = sqrt_alpha_prev * d_x0 + direction * d_eps
        target = tl.load(target_ptr + row + offsets, mask=mask, other=0.0).to(tl.float32)
        if SAMPLING:
            x_prev = mean + sigma * target
        else:
            x_prev = target
        positive = sigma > 0.0
        safe_sigma = tl.where(positive, sigma, 1.0)
        weight = tl.load(grad_log_pf_ptr + sample) / (safe_sigma * safe_sigma)
        if MEAN:
            weight = weight / (n_elements * 1.0)
        weight = tl.where(positive, weight, 0.0)
        grad_eps += weight * d_mean * (x_prev - mean)
    tl.store(grad_eps_ptr + row + offsets, grad_eps.to(grad_eps_ptr.dtype.element_ty), mask=mask)


def _launch_config(n_elements: int) -> tuple[int, int]:
    """(BLOCK_SIZE, n_blocks) for rows of ``n_elements``; small rows get one right-sized block."""
    block_size = min(_BLOCK_SIZE, triton.next_power_of_2(n_elements))
    return block_size, triton.cdiv(n_elements, block_size)


def _per_sample_alphas(alpha: torch.Tensor, batch: int, name: str, device: torch.device) -> torch.Tensor:
    """[B] (or one value for the whole batch, as the reference's broadcasting allows) -> contiguous [B] fp32."""
    flat = alpha.detach().to(device=device, dtype=torch.float32).reshape(-1)
    if flat.numel() == 1:
        flat = flat.expand(batch)
    if flat.numel() != batch:
        raise ValueError(f"{name} must have B={batch} values (or one), got shape {tuple(alpha.shape)}")
    return flat.contiguous()


def _ddim_step_forward(
    eps: torch.Tensor,
    x_t: torch.Tensor,
    target: torch.Tensor,
    alpha_t: torch.Tensor,
    alpha_prev: torch.Tensor,
    eta: float,
    sampling: bool,
    reduce: str,
    prediction: int,
    clip_range: Optional[float],
    out_shape: torch.Size,
) -> tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward. Inputs are [B, D] contiguous, alphas [B] fp32. Returns (x_prev or None, log_pf [B],
    log_pb [B], x0_pred), x_prev and x0_pred contiguous of ``out_shape`` in x_t's dtype."""
    batch, n_elements = x_t.shape
    block_size, n_blocks = _launch_config(n_elements)
    # Allocated in the caller's shape, not viewed afterwards: autograd.Function outputs must not be views.
    x0_pred = torch.empty(out_shape, dtype=x_t.dtype, device=x_t.device)
    x_prev = torch.empty_like(x0_pred) if sampling else None
    sq_pf = torch.empty((batch, n_blocks), dtype=torch.float32, device=x_t.device)
    sq_pb = torch.empty_like(sq_pf)
    _ddim_step_forward_kernel[(batch, n_blocks)](
        eps, x_t, target, alpha_t, alpha_prev, eta, 0.0 if clip_range is None else float(clip_range),
        x_prev if sampling else x0_pred,  # never written when scoring; any valid pointer will do
        x0_pred, sq_pf, sq_pb, n_elements, n_blocks,
        SAMPLING=sampling, PREDICTION=prediction, CLIP=clip_range is not None, BLOCK_SIZE=block_size,
        num_warps=_NUM_WARPS,
    )  # fmt: skip
    log_pf = torch.empty(batch, dtype=torch.float32, device=x_t.device)
    log_pb = torch.empty_like(log_pf)
    _ddim_step_reduce_kernel[(batch,)](
        sq_pf, sq_pb, alpha_t, alpha_prev, eta, log_pf, log_pb, n_elements, n_blocks,
        MEAN=reduce == "mean", BLOCK_SIZE=min(_MAX_PARTIALS_BLOCK, triton.next_power_of_2(n_blocks)),
    )  # fmt: skip
    return x_prev, log_pf, log_pb, x0_pred


def _ddim_step_backward(
    eps: torch.Tensor,
    x_t: torch.Tensor,
    target: torch.Tensor,
    alpha_t: torch.Tensor,
    alpha_prev: torch.Tensor,
    eta: float,
    sampling: bool,
    reduce: str,
    prediction: int,
    clip_range: Optional[float],
    grad_x0_pred: Optional[torch.Tensor],
    grad_log_pf: Optional[torch.Tensor],
    out_shape: torch.Size,
) -> torch.Tensor:
    """Launch the backward; returns ∂L/∂ε̂ of ``out_shape`` (contiguous) in eps's dtype."""
    batch, n_elements = x_t.shape
    block_size, n_blocks = _launch_config(n_elements)
    grad_eps = torch.empty(out_shape, dtype=eps.dtype, device=eps.device)
    _ddim_step_backward_kernel[(batch, n_blocks)](
        eps, x_t, target, alpha_t, alpha_prev, eta, 0.0 if clip_range is None else float(clip_range),
        grad_x0_pred.contiguous() if grad_x0_pred is not None else eps,  # placeholder pointers are never read
        grad_log_pf.to(torch.float32).contiguous() if grad_log_pf is not None else alpha_t,
        grad_eps, n_elements,
        SAMPLING=sampling, PREDICTION=prediction, CLIP=clip_range is not None, MEAN=reduce == "mean",
        HAS_GRAD_X0=grad_x0_pred is not None, HAS_GRAD_LOG_PF=grad_log_pf is not None,
        BLOCK_SIZE=block_size, num_warps=_NUM_WARPS,
    )  # fmt: skip
    return grad_eps


class DDIMStepFunction(torch.autograd.Function):
    """Fused DDIM step; differentiable in ``eps`` only (x_t, the alphas and x_{t−1} are data, not functions of θ).

    Written below for an ε̂-prediction model without clipping; for the other prediction types (and the clip of
    x̂_0) c_0 and c_μ become elementwise ∂x̂_0/∂o and ∂μ/∂o of :func:`_predict_x0_eps` (0 where the clip is active).

    Per sample b with D elements and w = 1/D for ``mean`` (1 for ``sum``), element i (per-sample scalars from ᾱ_t,
    ᾱ_{t−1}, η as in the module docstring):

        x̂_0,i = (x_t,i − √(1−ᾱ_t) ε̂_i) / √ᾱ_t           ∂x̂_0,i/∂ε̂_i = −√(1−ᾱ_t)/√ᾱ_t =: c_0
        μ_i   = √ᾱ_{t−1} x̂_0,i + √(1−ᾱ_{t−1}−σ²) ε̂_i     ∂μ_i/∂ε̂_i   = √ᾱ_{t−1} c_0 + √(1−ᾱ_{t−1}−σ²) =: c_μ
        log_pf = w Σ_i [−(x_{t−1,i} − μ_i)² / (2σ²) − log σ − log √(2π)]
        ∂log_pf/∂ε̂_i = w c_μ (x_{t−1,i} − μ_i) / σ²       (0 when σ = 0: the step has no density)

    so, with upstream gradients G_0 = ∂L/∂x̂_0 [B, D] and g_pf = ∂L/∂log_pf [B]:

        ∂L/∂ε̂_i = c_0 G_0,i + g_pf w c_μ (x_{t−1,i} − μ_i) / σ²

    When sampling, x_{t−1} = μ + σ·z is detached (as in the reference): it is an output without gradient, and the
    backward recomputes it in fp32 from the saved noise z, so (x_{t−1} − μ) = σz up to the forward's rounding.
    log_pb depends only on x_t and the detached x_{t−1}: no gradient reaches ε̂ through it.
    """

    @staticmethod
    def forward(
        ctx: Any,
        eps: torch.Tensor,
        x_t: torch.Tensor,
        alpha_t: torch.Tensor,
        alpha_prev: torch.Tensor,
        eta: float,
        target: torch.Tensor,
        sampling: bool,
        reduce: str,
        prediction: int,
        clip_range: Optional[float],
    ) -> tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        shape = x_t.shape
        batch = shape[0]
        eps2d, x_t2d, target2d = (t.detach().reshape(batch, -1).contiguous() for t in (eps, x_t, target))
        alpha_t32 = _per_sample_alphas(alpha_t, batch, "alpha_t", x_t.device)
        alpha_prev32 = _per_sample_alphas(alpha_prev, batch, "alpha_prev", x_t.device)
        x_prev, log_pf, log_pb, x0_pred = _ddim_step_forward(
            eps2d, x_t2d, target2d, alpha_t32, alpha_prev32, eta, sampling, reduce, prediction, clip_range, shape
        )
        ctx.save_for_backward(eps2d, x_t2d, target2d, alpha_t32, alpha_prev32)
        ctx.eta, ctx.sampling, ctx.reduce, ctx.shape = eta, sampling, reduce, shape
        ctx.prediction, ctx.clip_range = prediction, clip_range
        ctx.set_materialize_grads(False)
        # One call: each mark_non_differentiable replaces the previous set.
        ctx.mark_non_differentiable(log_pb, *([x_prev] if x_prev is not None else []))
        return x_prev, log_pf, log_pb, x0_pred

    @staticmethod
    def backward(
        ctx: Any,
        grad_x_prev: Optional[torch.Tensor],
        grad_log_pf: Optional[torch.Tensor],
        grad_log_pb: Optional[torch.Tensor],
        grad_x0_pred: Optional[torch.Tensor],
    ) -> tuple[Optional[torch.Tensor], ...]:
        grad_eps = None
        if ctx.needs_input_grad[0] and (grad_log_pf is not None or grad_x0_pred is not None):
            eps2d, x_t2d, target2d, alpha_t32, alpha_prev32 = ctx.saved_tensors
            batch = eps2d.shape[0]
            grad_eps = _ddim_step_backward(
                eps2d, x_t2d, target2d, alpha_t32, alpha_prev32, ctx.eta, ctx.sampling, ctx.reduce,
                ctx.prediction, ctx.clip_range, grad_x0_pred.reshape(batch, -1) if grad_x0_pred is not None else None,
                grad_log_pf, ctx.shape,
            )  # fmt: skip
        return grad_eps, None, None, None, None, None, None, None, None, None


def ddim_step_triton(
    eps: torch.Tensor,
    x_t: torch.Tensor,
    alpha_t: torch.Tensor,
    alpha_prev: torch.Tensor,
    eta: float,
    x_prev: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
    reduce: str = "mean",
    prediction_type: str = "epsilon",
    clip_sample_range: Optional[float] = None,
) -> DDIMStepOutput:
    """Fused Triton twin of :func:`ddim_step_reference`: same signature, same outputs, computed in fp32.

    Args and returns as :func:`ddim_step_reference`. Gradients reach ``eps`` only (see :class:`DDIMStepFunction`).
    When sampling without ``noise``, the noise is drawn with ``torch.randn_like`` in fp32 exactly as the reference
    does, so both backends sample the same x_{t−1} under the same seed.
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    require_triton()
    sampling = x_prev is None
    if sampling:
        if noise is None:
            noise = torch.randn_like(x_t, dtype=torch.float32)
        target = noise
    else:
        target = x_prev
    for name, tensor in (("eps", eps), ("noise" if sampling else "x_prev", target)):
        if tensor.shape != x_t.shape or tensor.device != x_t.device:
            raise ValueError(
                f"{name} must have x_t's shape {tuple(x_t.shape)} and device {x_t.device}, "
                f"got {tuple(tensor.shape)} on {tensor.device}"
            )
    sampled, log_pf, log_pb, x0_pred = DDIMStepFunction.apply(
        eps, x_t, alpha_t, alpha_prev, float(eta), target, sampling, reduce,
        PREDICTION_TYPES.index(prediction_type), None if clip_sample_range is None else float(clip_sample_range),
    )
    return DDIMStepOutput(sampled if sampling else x_prev, log_pf, log_pb, x0_pred)
