"""Backend dispatch for the step math: one call site in the trainer, the Triton kernel or its PyTorch reference
behind it (config ``kernels.backend``).

==============  ==============================================================================================
``auto``        Triton for CUDA tensors when Triton is installed, the reference otherwise (CPU, no Triton)
``triton``      always the Triton kernel; on CPU tensors only in Triton's interpreter (``TRITON_INTERPRET=1``
                set before ``import kernels``), otherwise a ValueError
``reference``   always the PyTorch reference
==============  ==============================================================================================
"""
from __future__ import annotations

from typing import Literal, Optional, Union

import torch

from fastdag.kernels._compat import HAS_TRITON, INTERPRETED
from fastdag.kernels.db_residual import (
    db_loss_reference,
    db_loss_triton,
    db_residual_reference,
    db_residual_triton,
    rloo_advantages_reference,
    rloo_advantages_triton,
)
from fastdag.kernels.ddim_step import DDIMStepOutput, ddim_step_reference, ddim_step_triton
from fastdag.kernels.flow_step import FlowCoefficients, FlowStepOutput, flow_step_reference, flow_step_triton

BACKENDS = ("auto", "triton", "reference")
Backend = Literal["auto", "triton", "reference"]


def resolve_backend(backend: str, device: Union[torch.device, str]) -> Literal["triton", "reference"]:
    """The implementation that ``backend`` selects for tensors on ``device``: ``"triton"`` or ``"reference"``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if backend == "reference":
        return "reference"
    if backend == "auto":
        return "triton" if HAS_TRITON and device.type == "cuda" else "reference"
    if not HAS_TRITON:
        raise ValueError("backend='triton' needs Triton installed; use 'auto' or 'reference'")
    if device.type != "cuda" and not INTERPRETED:
        raise ValueError(
            f"backend='triton' on {device.type} tensors needs Triton's interpreter: set TRITON_INTERPRET=1 before "
            "importing kernels (the kernels are decorated at import), or use 'auto' or 'reference'"
        )
    return "triton"


def ddim_step(
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
    backend: Backend = "auto",
) -> DDIMStepOutput:
    """:func:`fastdag.kernels.ddim_step.ddim_step_reference` or its Triton twin, chosen by ``backend`` for x_t's device."""
    fn = ddim_step_triton if resolve_backend(backend, x_t.device) == "triton" else ddim_step_reference
    return fn(eps, x_t, alpha_t, alpha_prev, eta, x_prev=x_prev, noise=noise, reduce=reduce,
              prediction_type=prediction_type, clip_sample_range=clip_sample_range)


def flow_step(
    v: torch.Tensor,
    x: torch.Tensor,
    coefficients: FlowCoefficients,
    x_prev: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
    reduce: str = "mean",
    backend: Backend = "auto",
) -> FlowStepOutput:
    """:func:`fastdag.kernels.flow_step.flow_step_reference` or its Triton twin, chosen by ``backend`` for x's device."""
    fn = flow_step_triton if resolve_backend(backend, x.device) == "triton" else flow_step_reference
    return fn(v, x, coefficients, x_prev=x_prev, noise=noise, reduce=reduce)


def db_residual(
    log_flow_t: torch.Tensor,
    log_flow_prev: torch.Tensor,
    log_pf: torch.Tensor,
    log_pb: torch.Tensor,
    backend: Backend = "auto",
) -> torch.Tensor:
    """:func:`fastdag.kernels.db_residual.db_residual_reference` or its Triton twin: δ [B] fp32."""
    fn = db_residual_triton if resolve_backend(backend, log_flow_t.device) == "triton" else db_residual_reference
    return fn(log_flow_t, log_flow_prev, log_pf, log_pb)


def db_loss(
    log_flow_t: torch.Tensor,
    log_flow_prev: torch.Tensor,
    log_pf: torch.Tensor,
    log_pb: torch.Tensor,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fastdag.kernels.db_residual.db_loss_reference` or its Triton twin: (δ [B] fp32, mean(δ²))."""
    fn = db_loss_triton if resolve_backend(backend, log_flow_t.device) == "triton" else db_loss_reference
    return fn(log_flow_t, log_flow_prev, log_pf, log_pb)


def rloo_advantages(a: torch.Tensor, adv_clip: float, backend: Backend = "auto", normaliser: str = "official") -> torch.Tensor:
    """:func:`fastdag.kernels.db_residual.rloo_advantages_reference` or its Triton twin: A [B] fp32, no gradient."""
    fn = rloo_advantages_triton if resolve_backend(backend, a.device) == "triton" else rloo_advantages_reference
    return fn(a, adv_clip, normaliser)
