"""Step math (DDIM, rectified flow) and the DB residual, shared by rollout, training, tests and benchmarks: each kernel beside its PyTorch reference.

``fastdag.kernels.dispatch`` (re-exported here) routes each call to the Triton kernel or the reference by backend and
device. Importing this package does not need Triton; only launching a Triton kernel does.
"""
from fastdag.kernels._compat import HAS_TRITON
from fastdag.kernels.db_residual import (
    db_loss_reference,
    db_loss_triton,
    db_residual_reference,
    db_residual_triton,
    rloo_advantages_reference,
    rloo_advantages_triton,
)
from fastdag.kernels.ddim_step import DDIMStepOutput, ddim_step_reference, ddim_step_triton
from fastdag.kernels.dispatch import (
    BACKENDS, db_loss, db_residual, ddim_step, flow_step, resolve_backend, rloo_advantages,
)
from fastdag.kernels.flow_step import (
    FlowCoefficients, FlowStepOutput, flow_step_coefficients, flow_step_reference, flow_step_triton,
)

__all__ = [
    "BACKENDS",
    "DDIMStepOutput",
    "HAS_TRITON",
    "db_loss",
    "db_loss_reference",
    "db_loss_triton",
    "db_residual",
    "db_residual_reference",
    "db_residual_triton",
    "ddim_step",
    "ddim_step_reference",
    "ddim_step_triton",
    "flow_step",
    "flow_step_coefficients",
    "flow_step_reference",
    "flow_step_triton",
    "FlowCoefficients",
    "FlowStepOutput",
    "resolve_backend",
    "rloo_advantages",
    "rloo_advantages_reference",
    "rloo_advantages_triton",
]
