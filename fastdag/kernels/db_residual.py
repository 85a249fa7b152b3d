"""The detailed-balance residual of DAG (DESIGN.md §1, Eq. 8 of the paper), its loss, and the RLOO advantages of
DAG-KL (Eq. 14):

    δ   = log F(x_t) + log p_θ(x_{t−1} | x_t) − log q(x_t | x_{t−1}) − log F(x_{t−1})
    L_DB = mean(δ²)
    A_i = clip((a_i − b_i) / (√v_i + 1e-8), −adv_clip, adv_clip),   a = sg(−δ),  b_i = mean_{j≠i} a_j
    official (scripts/train_gfn.py):  v_i = mean_{j≠i} (a_j − b_j)²
    loo_std:                          v_i = the unbiased variance of {a_j : j ≠ i}

``log_flow_*`` are the full log-flows (F_φ plus the forward-looking β·r̂ term). Each PyTorch reference
(``*_reference``, the single source of truth for the trainer, tests and benchmarks) has a Triton twin
(``*_triton``) with the same signature; ``fastdag.kernels.dispatch`` picks one. All of them compute in fp32.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from fastdag.kernels._compat import require_triton, tl, triton

RLOO_EPS = 1e-8
RLOO_NORMALISERS = ("official", "loo_std")


def db_residual_reference(
    log_flow_t: torch.Tensor, log_flow_prev: torch.Tensor, log_pf: torch.Tensor, log_pb: torch.Tensor
) -> torch.Tensor:
    """All inputs [B]; returns δ [B] in fp32. Gradients reach every input that requires them."""
    f32 = torch.float32
    return log_flow_t.to(f32) + log_pf.to(f32) - log_pb.to(f32) - log_flow_prev.to(f32)


def db_loss_reference(
    log_flow_t: torch.Tensor, log_flow_prev: torch.Tensor, log_pf: torch.Tensor, log_pb: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """All inputs [B]; returns (δ [B] fp32, L_DB = mean(δ²) a 0-dim fp32 tensor). Gradients reach every input."""
    residual = db_residual_reference(log_flow_t, log_flow_prev, log_pf, log_pb)
    return residual, (residual**2).mean()


def rloo_advantages_reference(a: torch.Tensor, adv_clip: float, normaliser: str = "official") -> torch.Tensor:
    """Leave-one-out normalised advantages of DAG-KL.

    A_i = (a_i − b_i) / (√v_i + 1e-8), clipped to [−adv_clip, adv_clip], with b_i = mean_{j≠i} a_j and

    - ``official`` (scripts/train_gfn.py: ``rloo_var = (s.sum() − s) / (n − 1)``, s_j = (a_j − b_j)²):
      v_i = mean_{j≠i} (a_j − b_j)², each a_j against its own leave-one-out baseline;
    - ``loo_std``: v_i = the *unbiased* variance (divisor B − 2) of the B − 1 values other than a_i.

    Both need B >= 3 (loo_std needs two others; the trainer asks the same of both).

    Args:
        a: [B] per-sample returns, e.g. a = −δ. Treated as constants (the advantage is sg(·) in Eq. 14).
        adv_clip: clip bound (5 in the official code).
        normaliser: ``official`` or ``loo_std``.

    Returns:
        A [B] fp32, without gradient.
    """
    if normaliser not in RLOO_NORMALISERS:
        raise ValueError(f"normaliser must be one of {RLOO_NORMALISERS}, got {normaliser!r}")
    if a.dim() != 1 or a.shape[0] < 3:
        raise ValueError(f"a must be [B] with B >= 3 (an unbiased leave-one-out std needs 2 others), got {a.shape}")
    batch = a.shape[0]
    a32 = a.detach().to(torch.float32)
    # others[i] = a without a_i: [B, B − 1].
    keep = ~torch.eye(batch, dtype=torch.bool, device=a.device)
    others = a32.expand(batch, batch)[keep].view(batch, batch - 1)
    deviation = a32 - others.mean(dim=1)  # a_i − b_i
    if normaliser == "official":
        squares = deviation**2
        scale = (squares.expand(batch, batch)[keep].view(batch, batch - 1)).mean(dim=1).sqrt()
    else:
        scale = others.std(dim=1, unbiased=True)
    return (deviation / (scale + RLOO_EPS)).clamp(-adv_clip, adv_clip)


# Triton twins. B is a minibatch of transitions (tens to thousands), so the kernels are launch-bound; what matters
# is one launch instead of several small ones, fp32 accumulation and a deterministic reduction order.
_BLOCK_SIZE = 1024


@triton.jit
def _load_residual(log_flow_t_ptr, log_flow_prev_ptr, log_pf_ptr, log_pb_ptr, offsets, mask):
    """δ for one block of transitions, in fp32 and in the reference's order of operations."""
    log_flow_t = tl.load(log_flow_t_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    log_flow_prev = tl.load(log_flow_prev_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    log_pf = tl.load(log_pf_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    log_pb = tl.load(log_pb_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    return log_flow_t + log_pf - log_pb - log_flow_prev


@triton.jit
def _db_residual_kernel(
    log_flow_t_ptr, log_flow_prev_ptr, log_pf_ptr, log_pb_ptr,
    residual_ptr,  # [B] fp32
    n_transitions,
    BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    offsets = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_transitions
    residual = _load_residual(log_flow_t_ptr, log_flow_prev_ptr, log_pf_ptr, log_pb_ptr, offsets, mask)
    tl.store(residual_ptr + offsets, residual, mask=mask)


@triton.jit
def _db_loss_kernel(
    log_flow_t_ptr, log_flow_prev_ptr, log_pf_ptr, log_pb_ptr,
    residual_ptr,  # [B] fp32
    loss_ptr,  # 0-dim fp32
    n_transitions,
    BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    # One program walks the whole minibatch: a fixed summation order (deterministic) and no second launch.
    acc = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    for start in range(0, n_transitions, BLOCK_SIZE):
        offsets = start + tl.arange(0, BLOCK_SIZE)
        mask = offsets < n_transitions
        residual = _load_residual(log_flow_t_ptr, log_flow_prev_ptr, log_pf_ptr, log_pb_ptr, offsets, mask)
        tl.store(residual_ptr + offsets, residual, mask=mask)
        acc += tl.where(mask, residual * residual, 0.0)
    # `* 1.0` rather than .to(fp32): an int argument equal to 1 is specialised to a constexpr, which has no .to.
    tl.store(loss_ptr, tl.sum(acc, axis=0) / (n_transitions * 1.0))


@triton.jit
def _db_residual_backward_kernel(
    residual_ptr,  # [B] fp32 δ from the forward (read only when HAS_GRAD_LOSS)
    grad_residual_ptr,  # [B] ∂L/∂δ (read only when HAS_GRAD_RESIDUAL)
    grad_loss_ptr,  # 0-dim ∂L/∂L_DB (read only when HAS_GRAD_LOSS); a pointer, so no host sync
    grad_log_flow_t_ptr, grad_log_flow_prev_ptr, grad_log_pf_ptr, grad_log_pb_ptr,  # [B], each in its input's dtype
    n_transitions,
    HAS_GRAD_RESIDUAL: tl.constexpr,
    HAS_GRAD_LOSS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    offsets = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_transitions
    grad = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    if HAS_GRAD_RESIDUAL:
        grad += tl.load(grad_residual_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_GRAD_LOSS:
        # ∂ mean(δ²) / ∂δ_i = 2 δ_i / B
        residual = tl.load(residual_ptr + offsets, mask=mask, other=0.0)
        grad += tl.load(grad_loss_ptr).to(tl.float32) * 2.0 * residual / (n_transitions * 1.0)
    # ∂δ/∂log F(x_t) = ∂δ/∂log p_F = 1, ∂δ/∂log q = ∂δ/∂log F(x_{t−1}) = −1.
    tl.store(grad_log_flow_t_ptr + offsets, grad.to(grad_log_flow_t_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_log_pf_ptr + offsets, grad.to(grad_log_pf_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_log_pb_ptr + offsets, (-grad).to(grad_log_pb_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_log_flow_prev_ptr + offsets, (-grad).to(grad_log_flow_prev_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rloo_advantages_kernel(
    a_ptr,  # [B]
    advantages_ptr,  # [B] fp32
    n_samples,
    adv_clip,
    eps,
    OFFICIAL: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    # Single program, three passes over a (B is a minibatch): the mean, the centred sum of squares, then each
    # leave-one-out statistic in closed form, O(B) instead of the reference's O(B²).
    n = n_samples * 1.0  # fp32 (not .to: see _db_loss_kernel)
    acc = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    for start in range(0, n_samples, BLOCK_SIZE):
        offsets = start + tl.arange(0, BLOCK_SIZE)
        acc += tl.load(a_ptr + offsets, mask=offsets < n_samples, other=0.0).to(tl.float32)
    mean = tl.sum(acc, axis=0) / n
    acc = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    for start in range(0, n_samples, BLOCK_SIZE):
        offsets = start + tl.arange(0, BLOCK_SIZE)
        mask = offsets < n_samples
        centred = tl.where(mask, tl.load(a_ptr + offsets, mask=mask, other=0.0).to(tl.float32) - mean, 0.0)
        acc += centred * centred
    sum_sq = tl.sum(acc, axis=0)
    for start in range(0, n_samples, BLOCK_SIZE):
        offsets = start + tl.arange(0, BLOCK_SIZE)
        mask = offsets < n_samples
        centred = tl.load(a_ptr + offsets, mask=mask, other=0.0).to(tl.float32) - mean
        # Without a_i (c_i = a_i − mean): a_i − mean_{j≠i} = c_i·B/(B−1).
        deviation = centred * n / (n - 1.0)
        if OFFICIAL:
            # Σ_j (a_j − b_j)² = (B/(B−1))² Σc²; leave out d_i² and average over the B − 1 others.
            total = sum_sq * (n / (n - 1.0)) * (n / (n - 1.0))
            std = tl.sqrt(tl.maximum(total - deviation * deviation, 0.0) / (n - 1.0))
        else:
            # The others' centred sum of squares is Σc² − c_i²·B/(B−1) (Welford's removal update), clamped at 0
            # against rounding; unbiased divisor B − 2.
            others_sum_sq = tl.maximum(sum_sq - centred * deviation, 0.0)
            std = tl.sqrt(others_sum_sq / (n - 2.0))
        advantage = tl.minimum(tl.maximum(deviation / (std + eps), -adv_clip), adv_clip)
        tl.store(advantages_ptr + offsets, advantage, mask=mask)


def _flat_transitions(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Check that every input is [B] with the same B and device; return them contiguous and detached."""
    batch = tensors[0].shape[0] if tensors[0].dim() == 1 else -1
    for t in tensors:
        if t.dim() != 1 or t.shape[0] != batch or t.device != tensors[0].device:
            raise ValueError(
                f"inputs must all be [B] on one device, got shapes {[tuple(u.shape) for u in tensors]} "
                f"on {[str(u.device) for u in tensors]}"
            )
    return [t.detach().contiguous() for t in tensors]


def _db_residual_backward(
    residual: torch.Tensor,
    grad_residual: Optional[torch.Tensor],
    grad_loss: Optional[torch.Tensor],
    input_dtypes: list[torch.dtype],
) -> tuple[torch.Tensor, ...]:
    """Launch the backward shared by DBResidualFunction and DBLossFunction; [B] grads in each input's dtype."""
    n_transitions = residual.shape[0]
    grads = tuple(torch.empty(n_transitions, dtype=dtype, device=residual.device) for dtype in input_dtypes)
    block_size = min(_BLOCK_SIZE, triton.next_power_of_2(n_transitions))
    _db_residual_backward_kernel[(triton.cdiv(n_transitions, block_size),)](
        residual,
        grad_residual.contiguous() if grad_residual is not None else residual,  # placeholders are never read
        grad_loss if grad_loss is not None else residual,
        *grads, n_transitions,
        HAS_GRAD_RESIDUAL=grad_residual is not None, HAS_GRAD_LOSS=grad_loss is not None, BLOCK_SIZE=block_size,
    )  # fmt: skip
    return grads


class DBResidualFunction(torch.autograd.Function):
    """δ = log F(x_t) + log p_F − log p_B − log F(x_{t−1}); ∂δ/∂ = (+1, −1, +1, −1) for
    (log_flow_t, log_flow_prev, log_pf, log_pb), so each input's gradient is ±∂L/∂δ in the input's dtype."""

    @staticmethod
    def forward(
        ctx: Any, log_flow_t: torch.Tensor, log_flow_prev: torch.Tensor, log_pf: torch.Tensor, log_pb: torch.Tensor
    ) -> torch.Tensor:
        inputs = _flat_transitions(log_flow_t, log_flow_prev, log_pf, log_pb)
        n_transitions = inputs[0].shape[0]
        residual = torch.empty(n_transitions, dtype=torch.float32, device=log_flow_t.device)
        block_size = min(_BLOCK_SIZE, triton.next_power_of_2(n_transitions))
        _db_residual_kernel[(triton.cdiv(n_transitions, block_size),)](
            *inputs, residual, n_transitions, BLOCK_SIZE=block_size
        )
        ctx.input_dtypes = [t.dtype for t in inputs]  # each gradient comes back in its input's dtype
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(residual)
        return residual

    @staticmethod
    def backward(ctx: Any, grad_residual: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], ...]:
        if grad_residual is None:
            return None, None, None, None
        (residual,) = ctx.saved_tensors
        grads = _db_residual_backward(residual, grad_residual, None, ctx.input_dtypes)
        return tuple(g if needed else None for g, needed in zip(grads, ctx.needs_input_grad))


class DBLossFunction(torch.autograd.Function):
    """(δ [B], L_DB = mean(δ²)) in one launch. Backward: ∂L/∂δ_i = G_δ,i + G_L · 2δ_i/B, then ± per input as in
    :class:`DBResidualFunction`."""

    @staticmethod
    def forward(
        ctx: Any, log_flow_t: torch.Tensor, log_flow_prev: torch.Tensor, log_pf: torch.Tensor, log_pb: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = _flat_transitions(log_flow_t, log_flow_prev, log_pf, log_pb)
        n_transitions = inputs[0].shape[0]
        residual = torch.empty(n_transitions, dtype=torch.float32, device=log_flow_t.device)
        loss = torch.empty((), dtype=torch.float32, device=log_flow_t.device)
        block_size = min(_BLOCK_SIZE, triton.next_power_of_2(n_transitions))
        _db_loss_kernel[(1,)](*inputs, residual, loss, n_transitions, BLOCK_SIZE=block_size)
        ctx.input_dtypes = [t.dtype for t in inputs]
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(residual)
        return residual, loss

    @staticmethod
    def backward(
        ctx: Any, grad_residual: Optional[torch.Tensor], grad_loss: Optional[torch.Tensor]
    ) -> tuple[Optional[torch.Tensor], ...]:
        if grad_residual is None and grad_loss is None:
            return None, None, None, None
        (residual,) = ctx.saved_tensors
        grads = _db_residual_backward(residual, grad_residual, grad_loss, ctx.input_dtypes)
        return tuple(g if needed else None for g, needed in zip(grads, ctx.needs_input_grad))


def db_residual_triton(
    log_flow_t: torch.Tensor, log_flow_prev: torch.Tensor, log_pf: torch.Tensor, log_pb: torch.Tensor
) -> torch.Tensor:
    """Triton twin of :func:`db_residual_reference`: inputs [B] of any float dtype, δ [B] fp32, gradients to all."""
    require_triton()
    return DBResidualFunction.apply(log_flow_t, log_flow_prev, log_pf, log_pb)


def db_loss_triton(
    log_flow_t: torch.Tensor, log_flow_prev: torch.Tensor, log_pf: torch.Tensor, log_pb: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`db_loss_reference`: (δ [B] fp32, mean(δ²) 0-dim fp32) in one launch."""
    require_triton()
    return DBLossFunction.apply(log_flow_t, log_flow_prev, log_pf, log_pb)


def rloo_advantages_triton(a: torch.Tensor, adv_clip: float, normaliser: str = "official") -> torch.Tensor:
    """Triton twin of :func:`rloo_advantages_reference`: a [B] (B >= 3) -> A [B] fp32, without gradient."""
    if normaliser not in RLOO_NORMALISERS:
        raise ValueError(f"normaliser must be one of {RLOO_NORMALISERS}, got {normaliser!r}")
    require_triton()
    if a.dim() != 1 or a.shape[0] < 3:
        raise ValueError(f"a must be [B] with B >= 3 (an unbiased leave-one-out std needs 2 others), got {a.shape}")
    n_samples = a.shape[0]
    advantages = torch.empty(n_samples, dtype=torch.float32, device=a.device)
    _rloo_advantages_kernel[(1,)](
        a.detach().contiguous(), advantages, n_samples, float(adv_clip), RLOO_EPS, OFFICIAL=normaliser == "official",
        BLOCK_SIZE=min(_BLOCK_SIZE, triton.next_power_of_2(n_samples)),
    )  # fmt: skip
    return advantages
