"""One rectified-flow sampler step with the log-densities of the forward policy and of the backward (noising) kernel.

Notation (DESIGN.md §8; x_σ = (1−σ)·x₀ + σ·ε, σ from 1 (noise) to 0 (data), the model predicts v ≈ ε − x₀):

==============  ====================================================================================================
``sigma``       σ, the current noise level; ``sigma_next`` σ′ < σ the next one; Δ = σ′ − σ < 0
``v``           the (guided) velocity prediction v̂
``x0_pred``     x̂₀ = x − σ v̂                        ε̂ = x + (1−σ) v̂
``sde``         Flow-GRPO (flow_grpo/diffusers_patch/sd3_sde_with_logprob.py), noise level a:
                σ_t = a √(σ / (1−σ))  (at σ = 1 the schedule's second σ replaces σ in 1−σ, as flow_grpo does)
                mean = x + [v̂ + σ_t²/(2σ) (x + (1−σ) v̂)] Δ,   std = σ_t √(−Δ)
``cps``         coefficients-preserving sampling: s = σ′ sin(aπ/2),  mean = (1−σ′) x̂₀ + √(σ′² − s²) ε̂,  std = s
``log_pf``      log N(x_σ′; mean, std² I)                         forward policy p_θ(x_σ′ | x_σ)
``log_pb``      log N(x_σ; b x_σ′, std_b² I), b = (1−σ)/(1−σ′), std_b² = σ² − b² σ′²
                                                                   backward policy q(x_σ | x_σ′)
==============  ====================================================================================================

The backward kernel is the Markov noising kernel that keeps the rectified-flow marginals: composed from x₀ it gives
N((1−σ) x₀, σ² I) for every σ (tests/test_flow_sampler.py checks both in closed form and by Monte Carlo). It is the
p_B of DAG's detailed-balance condition on a flow-matching model, which no published GFlowNet method has used yet.

Both samplers are affine in v̂ with per-sample scalars, mean = c_x x + c_v v̂, so one fused step covers them:
:func:`flow_step_coefficients` turns (σ, σ′, a, sampler) into :class:`FlowCoefficients`, precomputed once per schedule
on the device; :func:`flow_step_reference` (the PyTorch reference, the single source of truth) and its fused Triton
twin :func:`flow_step_triton` take the coefficients of each sample. Noise level 0 is the deterministic Euler step
x + Δ v̂, exactly ``FlowMatchEulerDiscreteScheduler.step``. A step whose std is zero (noise level 0, or CPS at
σ′ = 0) has no density: its ``log_pf`` is 0 with no gradient, as for DDIM. Log-densities are reduced over the
non-batch dimensions by ``mean`` (the DAG/DDPO convention, and flow_grpo's) or ``sum``; everything in fp32.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import torch

from fastdag.kernels._compat import require_triton, tl, triton
from fastdag.kernels.ddim_step import REDUCTIONS, _gaussian_log_density, _launch_config, _per_sample_alphas

SDE_TYPES = ("sde", "cps")
_LOG_SQRT_2PI_TL = tl.constexpr(0.5 * math.log(2 * math.pi))
_NUM_WARPS = 4
_MAX_PARTIALS_BLOCK = 1024


class FlowStepOutput(NamedTuple):
    """``x_prev`` (the next state x_σ′) and ``x0_pred`` have the shape of ``x``; ``log_pf``, ``log_pb`` are [B] fp32."""

    x_prev: torch.Tensor
    log_pf: torch.Tensor
    log_pb: torch.Tensor
    x0_pred: torch.Tensor


class FlowCoefficients(NamedTuple):
    """The per-step scalars of a flow step, each [T] (a schedule) or [B] (one per sample), fp32.

    mean = c_x x + c_v v̂, std (forward); x̂₀ = x + d v̂ (d = −σ); p_B: N(b x_σ′, std_b²).
    """

    c_x: torch.Tensor
    c_v: torch.Tensor
    std: torch.Tensor
    d: torch.Tensor
    b: torch.Tensor
    std_b: torch.Tensor

    def at(self, index: torch.Tensor) -> "FlowCoefficients":
        """The coefficients of steps ``index`` [B] (a gather on the device: no host sync)."""
        return FlowCoefficients(*(c[index] for c in self))


def flow_step_coefficients(sigma: torch.Tensor, sigma_next: torch.Tensor, noise_level: float, sde_type: str = "sde",
                           sigma_max: Optional[float] = None) -> FlowCoefficients:
    """:class:`FlowCoefficients` of steps σ -> σ′ (each [T]), computed in float64 and stored in fp32.

    ``sigma_max`` stands in for σ in σ_t's 1 − σ where σ = 1 (flow_grpo: the schedule's second σ); None: σ′ there.
    """
    if sde_type not in SDE_TYPES:
        raise ValueError(f"sde_type must be one of {SDE_TYPES}, got {sde_type!r}")
    s, s_next = sigma.double(), sigma_next.double()
    delta = s_next - s  # Δ < 0
    if sde_type == "sde":
        stand_in = s_next if sigma_max is None else torch.full_like(s, float(sigma_max))
        std_t = noise_level * torch.sqrt(s / (1 - torch.where(s >= 1, stand_in, s)))
        c_x = 1 + std_t**2 / (2 * s) * delta
        c_v = delta * (1 + std_t**2 * (1 - s) / (2 * s))
        std = std_t * torch.sqrt(-delta)
    else:
        std = s_next * math.sin(noise_level * math.pi / 2)
        direction = torch.sqrt((s_next**2 - std**2).clamp_min(0))
        c_x = (1 - s_next) + direction  # (1−σ′) x̂₀ + c ε̂ with x̂₀ = x − σ v̂, ε̂ = x + (1−σ) v̂
        c_v = -(1 - s_next) * s + direction * (1 - s)
    if noise_level == 0:  # exactly the Euler step x + Δ v̂ (FlowMatchEulerDiscreteScheduler.step)
        c_x, c_v, std = torch.ones_like(s), delta, torch.zeros_like(s)
    b = (1 - s) / (1 - s_next)
    std_b = torch.sqrt((s**2 - b**2 * s_next**2).clamp_min(0))
    return FlowCoefficients(*(t.float() for t in (c_x, c_v, std, -s, b, std_b)))


def flow_step_reference(
    v: torch.Tensor,
    x: torch.Tensor,
    coefficients: FlowCoefficients,
    x_prev: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
    reduce: str = "mean",
) -> FlowStepOutput:
    """One flow step x_σ -> x_σ′ with log p_F and log p_B, computed in fp32.

    Args:
        v: [B, ...] velocity prediction (carries θ; gradients flow through it).
        x: [B, ...] current state x_σ.
        coefficients: :class:`FlowCoefficients` with [B] entries (one step per sample).
        x_prev: [B, ...] a stored next state to score (training); None samples x_σ′ = mean + std·noise (rollout).
        noise: [B, ...] standard normal noise used when sampling; ``torch.randn_like`` if None.
        reduce: ``mean`` or ``sum`` over the non-batch dimensions.

    Returns:
        FlowStepOutput(x_prev in x's dtype, log_pf [B], log_pb [B], x0_pred in x's dtype). A given ``x_prev`` is
        returned as is and treated as data (no gradient).
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    out_dtype = x.dtype
    x32, v32 = x.to(torch.float32), v.to(torch.float32)
    c_x, c_v, std, d, b, std_b = (_per_sample(c, x) for c in coefficients)
    mean = c_x * x32 + c_v * v32
    x0_pred = x32 + d * v32
    if x_prev is None:
        if noise is None:
            noise = torch.randn_like(x32)
        x_next32 = (mean + std * noise.to(torch.float32)).detach()
        x_next_out = x_next32.to(out_dtype)
    else:
        x_next32 = x_prev.detach().to(torch.float32)
        x_next_out = x_prev
    log_pf = _gaussian_log_density(x_next32, mean, std, reduce)
    log_pb = _gaussian_log_density(x32, b * x_next32, std_b, reduce)
    return FlowStepOutput(x_next_out, log_pf, log_pb, x0_pred.to(out_dtype))


def _per_sample(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return c.to(torch.float32).reshape(-1, *([1] * (like.dim() - 1)))


# Fused Triton twin: one pass over v, x and x_σ′ (scoring) or the noise (sampling), as the DDIM step's.
#
# Forward: grid (B, n_blocks). Program (b, k) writes x̂₀ (and the sampled x_σ′) for its block of sample b and the
# block's sums of squared residuals (x_σ′ − mean)² and (x_σ − b x_σ′)² to two [B, n_blocks] fp32 buffers; a second
# launch, one program per sample, sums each row in a fixed order (deterministic, no atomics) and adds the constants.
@triton.jit
def _reduced_log_density(sum_sq, std, n_elements, MEAN: tl.constexpr):
    """Σ_i log N(x_i; μ_i, std²) from Σ_i (x_i − μ_i)² (÷ n_elements when MEAN); 0 where std == 0."""
    positive = std > 0.0
    safe_std = tl.where(positive, std, 1.0)
    n = n_elements * 1.0
    quadratic = -sum_sq / (2.0 * safe_std * safe_std)
    constant = tl.log(safe_std) + _LOG_SQRT_2PI_TL
    if MEAN:
        total = quadratic / n - constant
    else:
        total = quadratic - n * constant
    return tl.where(positive, total, 0.0)


@triton.jit
def _flow_step_forward_kernel(
    v_ptr, x_ptr,
    target_ptr,  # x_σ′ to score, or the standard normal noise when SAMPLING
    c_x_ptr, c_v_ptr, std_ptr, d_ptr, b_ptr,
    x_prev_out_ptr,  # written only when SAMPLING
    x0_pred_ptr,
    sq_pf_ptr, sq_pb_ptr,  # [B, n_blocks] fp32 partial sums
    n_elements, n_blocks,
    SAMPLING: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    sample = tl.program_id(0)
    block = tl.program_id(1)
    c_x = tl.load(c_x_ptr + sample)
    c_v = tl.load(c_v_ptr + sample)
    std = tl.load(std_ptr + sample)
    d = tl.load(d_ptr + sample)
    b = tl.load(b_ptr + sample)
    offsets = block * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    row = sample.to(tl.int64) * n_elements  # int64: B · D can pass 2³¹
    # Load, upcast, compute in fp32, downcast on store (the interpreter miscomputes bf16 arithmetic).
    v = tl.load(v_ptr + row + offsets, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + row + offsets, mask=mask, other=0.0).to(tl.float32)
    mean = c_x * x + c_v * v
    if SAMPLING:
        noise = tl.load(target_ptr + row + offsets, mask=mask, other=0.0).to(tl.float32)
        x_next = mean + std * noise
        tl.store(x_prev_out_ptr + row + offsets, x_next.to(x_prev_out_ptr.dtype.element_ty), mask=mask)
    else:
        x_next = tl.load(target_ptr + row + offsets, mask=mask, other=0.0).to(tl.float32)
    x0 = x + d * v
    tl.store(x0_pred_ptr + row + offsets, x0.to(x0_pred_ptr.dtype.element_ty), mask=mask)
    diff_pf = tl.where(mask, x_next - mean, 0.0)
    diff_pb = tl.where(mask, x - b * x_next, 0.0)
    partial = sample * n_blocks + block
    tl.store(sq_pf_ptr + partial, tl.sum(diff_pf * diff_pf, axis=0))
    tl.store(sq_pb_ptr + partial, tl.sum(diff_pb * diff_pb, axis=0))


@triton.jit
def _flow_step_reduce_kernel(
    sq_pf_ptr, sq_pb_ptr, std_ptr, std_b_ptr, log_pf_ptr, log_pb_ptr, n_elements, n_blocks,
    MEAN: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    sample = tl.program_id(0)
    acc_pf = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    acc_pb = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    for start in range(0, n_blocks, BLOCK_SIZE):  # fixed order: the result does not depend on scheduling
        offsets = start + tl.arange(0, BLOCK_SIZE)
        mask = offsets < n_blocks
        acc_pf += tl.load(sq_pf_ptr + sample * n_blocks + offsets, mask=mask, other=0.0)
        acc_pb += tl.load(sq_pb_ptr + sample * n_blocks + offsets, mask=mask, other=0.0)
    std = tl.load(std_ptr + sample)
    std_b = tl.load(std_b_ptr + sample)
    tl.store(log_pf_ptr + sample, _reduced_log_density(tl.sum(acc_pf, axis=0), std, n_elements, MEAN))
    tl.store(log_pb_ptr + sample, _reduced_log_density(tl.sum(acc_pb, axis=0), std_b, n_elements, MEAN))


@triton.jit
def _flow_step_backward_kernel(
    v_ptr, x_ptr, target_ptr, c_x_ptr, c_v_ptr, std_ptr, d_ptr,
    grad_x0_pred_ptr,  # [B, D] read only when HAS_GRAD_X0
    grad_log_pf_ptr,  # [B] read only when HAS_GRAD_LOG_PF
    grad_v_ptr,  # [B, D] in v's dtype
    n_elements,
    SAMPLING: tl.constexpr, MEAN: tl.constexpr, HAS_GRAD_X0: tl.constexpr, HAS_GRAD_LOG_PF: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    sample = tl.program_id(0)
    block = tl.program_id(1)
    offsets = block * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    row = sample.to(tl.int64) * n_elements
    grad_v = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    if HAS_GRAD_X0:
        d = tl.load(d_ptr + sample)
        grad_v += d * tl.load(grad_x0_pred_ptr + row + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_GRAD_LOG_PF:
        c_x = tl.load(c_x_ptr + sample)
        c_v = tl.load(c_v_ptr + sample)
        std = tl.load(std_ptr + sample)
        v = tl.load(v_ptr + row + offsets, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row + offsets, mask=mask, other=0.0).to(tl.float32)
        target = tl.load(target_ptr + row + offsets, mask=mask, other=0.0).to(tl.float32)
        mean = c_x * x + c_v * v  # recomputed as the forward did, rather than stored
        if SAMPLING:
            x_next = mean + std * target
        else:
            x_next = target
        positive = std > 0.0
        safe_std = tl.where(positive, std, 1.0)
        weight = tl.load(grad_log_pf_ptr + sample) / (safe_std * safe_std)
        if MEAN:
            weight = weight / (n_elements * 1.0)
        weight = tl.where(positive, weight, 0.0)
        grad_v += weight * c_v * (x_next - mean)
    tl.store(grad_v_ptr + row + offsets, grad_v.to(grad_v_ptr.dtype.element_ty), mask=mask)


class FlowStepFunction(torch.autograd.Function):
    """Fused flow step; differentiable in ``v`` only (x, the coefficients and x_σ′ are data, not functions of θ).

    Per sample with D elements and w = 1/D for ``mean`` (1 for ``sum``), element i:

        mean_i = c_x x_i + c_v v̂_i        x̂₀_i = x_i + d v̂_i
        log_pf = w Σ_i [−(x′_i − mean_i)² / (2 std²) − log std − log √(2π)]
        ∂log_pf/∂v̂_i = w c_v (x′_i − mean_i) / std²      (0 when std = 0: the step has no density)

    so ∂L/∂v̂_i = d G_0,i + g_pf w c_v (x′_i − mean_i) / std², with G_0 = ∂L/∂x̂₀ and g_pf = ∂L/∂log_pf. When sampling,
    x′ = mean + std·z is detached; the backward recomputes it from the saved noise z. log_pb has no gradient.
    """

    @staticmethod
    def forward(ctx: Any, v: torch.Tensor, x: torch.Tensor, coefficients: torch.Tensor, target: torch.Tensor,
                sampling: bool, reduce: str) -> tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        shape, batch = x.shape, x.shape[0]
        v2d, x2d, target2d = (t.detach().reshape(batch, -1).contiguous() for t in (v, x, target))
        c_x, c_v, std, d, b, std_b = coefficients  # [6, B] fp32, contiguous rows
        n_elements = x2d.shape[1]
        block_size, n_blocks = _launch_config(n_elements)
        x0_pred = torch.empty(shape, dtype=x.dtype, device=x.device)  # outputs must not be views
        x_next = torch.empty_like(x0_pred) if sampling else None
        sq_pf = torch.empty((batch, n_blocks), dtype=torch.float32, device=x.device)
        sq_pb = torch.empty_like(sq_pf)
        _flow_step_forward_kernel[(batch, n_blocks)](
            v2d, x2d, target2d, c_x, c_v, std, d, b, x_next if sampling else x0_pred, x0_pred, sq_pf, sq_pb,
            n_elements, n_blocks, SAMPLING=sampling, BLOCK_SIZE=block_size, num_warps=_NUM_WARPS,
        )  # fmt: skip
        log_pf = torch.empty(batch, dtype=torch.float32, device=x.device)
        log_pb = torch.empty_like(log_pf)
        _flow_step_reduce_kernel[(batch,)](
            sq_pf, sq_pb, std, std_b, log_pf, log_pb, n_elements, n_blocks,
            MEAN=reduce == "mean", BLOCK_SIZE=min(_MAX_PARTIALS_BLOCK, triton.next_power_of_2(n_blocks)),
        )  # fmt: skip
        ctx.save_for_backward(v2d, x2d, target2d, coefficients)
        ctx.sampling, ctx.reduce, ctx.shape, ctx.v_dtype = sampling, reduce, shape, v.dtype
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(log_pb, *([x_next] if x_next is not None else []))
        return x_next, log_pf, log_pb, x0_pred

    @staticmethod
    def backward(ctx: Any, grad_x_next: Optional[torch.Tensor], grad_log_pf: Optional[torch.Tensor],
                 grad_log_pb: Optional[torch.Tensor], grad_x0_pred: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], ...]:
        grad_v = None
        if ctx.needs_input_grad[0] and (grad_log_pf is not None or grad_x0_pred is not None):
            v2d, x2d, target2d, coefficients = ctx.saved_tensors
            c_x, c_v, std, d, _, _ = coefficients
            batch, n_elements = x2d.shape
            block_size, n_blocks = _launch_config(n_elements)
            grad_v = torch.empty(ctx.shape, dtype=ctx.v_dtype, device=v2d.device)
            _flow_step_backward_kernel[(batch, n_blocks)](
                v2d, x2d, target2d, c_x, c_v, std, d,
                grad_x0_pred.reshape(batch, -1).contiguous() if grad_x0_pred is not None else v2d,  # never read then
                grad_log_pf.to(torch.float32).contiguous() if grad_log_pf is not None else c_x,
                grad_v, n_elements, SAMPLING=ctx.sampling, MEAN=ctx.reduce == "mean",
                HAS_GRAD_X0=grad_x0_pred is not None, HAS_GRAD_LOG_PF=grad_log_pf is not None,
                BLOCK_SIZE=block_size, num_warps=_NUM_WARPS,
            )  # fmt: skip
        return grad_v, None, None, None, None, None


def flow_step_triton(
    v: torch.Tensor,
    x: torch.Tensor,
    coefficients: FlowCoefficients,
    x_prev: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
    reduce: str = "mean",
) -> FlowStepOutput:
    """Fused Triton twin of :func:`flow_step_reference`: same signature, same outputs, computed in fp32.

    Gradients reach ``v`` only (see :class:`FlowStepFunction`). When sampling without ``noise``, the noise is drawn
    with ``torch.randn_like`` in fp32 exactly as the reference does.
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    require_triton()
    sampling = x_prev is None
    if sampling:
        noise = torch.randn_like(x, dtype=torch.float32) if noise is None else noise
        target = noise
    else:
        target = x_prev
    for name, tensor in (("v", v), ("noise" if sampling else "x_prev", target)):
        if tensor.shape != x.shape or tensor.device != x.device:
            raise ValueError(f"{name} must have x's shape {tuple(x.shape)} and device {x.device}, "
                             f"got {tuple(tensor.shape)} on {tensor.device}")
    batch = x.shape[0]
    packed = torch.stack([_per_sample_alphas(c, batch, name, x.device)
                          for name, c in zip(FlowCoefficients._fields, coefficients)])  # [6, B]
    sampled, log_pf, log_pb, x0_pred = FlowStepFunction.apply(v, x, packed, target, sampling, reduce)
    return FlowStepOutput(sampled if sampling else x_prev, log_pf, log_pb, x0_pred)
