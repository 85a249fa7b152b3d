"""flow_step_triton against flow_step_reference: forward outputs and ∂/∂v, both modes, both reductions, both samplers
(Flow-GRPO's SDE and CPS), deterministic steps (noise 0, CPS's last step)."""
import os

# Interpreter mode must be chosen before kernels are decorated (tests/conftest.py does the same for the suite).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from kernel_testing import (  # noqa: E402
    DEVICE,
    assert_within_reference_error,
    poisoned_outputs_and_seed,  # noqa: F401 (autouse fixture)
    requires_triton,
)

from fastdag.kernels.ddim_step import REDUCTIONS  # noqa: E402
from fastdag.kernels.flow_step import (  # noqa: E402
    SDE_TYPES, FlowStepOutput, flow_step_coefficients, flow_step_reference, flow_step_triton,
)

pytestmark = requires_triton

# [B, C, H, W]: tiny, odd-sized (D = 105 < one block), odd across blocks (D = 16380 = 15·1024 + 1020)
SHAPES = [(2, 4, 8, 8), (1, 3, 5, 7), (3, 4, 63, 65)]
DTYPES = [torch.float32, torch.bfloat16]
MODES = ["scoring", "sampling"]


def _coefficients(batch: int, sde_type: str, noise_level: float = 0.7, last: bool = False):
    """Per-sample coefficients at random steps of a shifted schedule; ``last`` puts every other sample on σ′ = 0
    (CPS's deterministic last step) and the first on σ = 1 (flow_grpo's stand-in for 1 − σ)."""
    sigma = torch.empty(batch).uniform_(0.1, 0.95)
    sigma_next = sigma * torch.empty(batch).uniform_(0.3, 0.9)
    sigma[0] = 1.0
    if last:
        sigma_next[::2] = 0.0
    c = flow_step_coefficients(sigma, sigma_next, noise_level, sde_type, sigma_max=0.97)
    return type(c)(*(t.to(DEVICE) for t in c))


def _inputs(shape, dtype, mode, sde_type="sde", noise_level=0.7, last=False):
    v = torch.randn(shape, device=DEVICE).to(dtype)
    x = torch.randn(shape, device=DEVICE).to(dtype)
    coefficients = _coefficients(shape[0], sde_type, noise_level, last)
    if mode == "sampling":
        return v, x, coefficients, None, torch.randn(shape, device=DEVICE)
    # a next state sampled by a slightly different policy, as in training (θ vs θ_old)
    v_old = v.float() + 0.1 * torch.randn(shape, device=DEVICE)
    x_prev = flow_step_reference(v_old, x.float(), coefficients, noise=torch.randn(shape, device=DEVICE)).x_prev
    return v, x, coefficients, x_prev.to(dtype), None


def _upcast(t):
    return None if t is None else t.float()


def _check_outputs(out: FlowStepOutput, ref32: FlowStepOutput, ref_lowp: FlowStepOutput) -> None:
    for name in FlowStepOutput._fields:
        assert_within_reference_error(getattr(out, name), getattr(ref32, name), getattr(ref_lowp, name), name)
    assert out.log_pf.dtype == out.log_pb.dtype == torch.float32


@pytest.mark.parametrize("sde_type", SDE_TYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduce", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_flow_step_forward(shape, dtype, reduce, mode, sde_type):
    v, x, c, x_prev, noise = _inputs(shape, dtype, mode, sde_type)
    out = flow_step_triton(v, x, c, x_prev=x_prev, noise=noise, reduce=reduce)
    ref32 = flow_step_reference(v.float(), x.float(), c, x_prev=_upcast(x_prev), noise=noise, reduce=reduce)
    ref_lowp = flow_step_reference(v, x, c, x_prev=x_prev, noise=noise, reduce=reduce)
    _check_outputs(out, ref32, ref_lowp)
    if mode == "scoring":
        assert out.x_prev is x_prev  # a given next state is data, returned as is


@pytest.mark.parametrize("sde_type", SDE_TYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduce", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_flow_step_backward(dtype, reduce, mode, sde_type):
    shape = (3, 4, 63, 65)
    v, x, c, x_prev, noise = _inputs(shape, dtype, mode, sde_type)
    grad_x0 = torch.randn(shape, device=DEVICE).to(dtype)
    grad_log_pf = torch.randn(shape[0], device=DEVICE)

    def grad_v(fn, v_in, x_in, x_prev_in, grad_x0_in):
        leaf = v_in.detach().requires_grad_(True)
        out = fn(leaf, x_in, c, x_prev=x_prev_in, noise=noise, reduce=reduce)
        assert not out.x_prev.requires_grad and not out.log_pb.requires_grad
        loss = (out.x0_pred * grad_x0_in).float().sum() + (out.log_pf * grad_log_pf).sum()
        (grad,) = torch.autograd.grad(loss, leaf)
        assert grad.dtype == v_in.dtype
        return grad

    grad = grad_v(flow_step_triton, v, x, x_prev, grad_x0)
    grad32 = grad_v(flow_step_reference, v.float(), x.float(), _upcast(x_prev), grad_x0.float())
    grad_lowp = grad_v(flow_step_reference, v, x, x_prev, grad_x0)
    assert_within_reference_error(grad, grad32, grad_lowp, "grad_v")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sde_type", SDE_TYPES)
def test_flow_step_log_pf_gradient_alone(sde_type, mode):
    """log_pf alone (beside x0_pred's term it sits below bf16 resolution when mean-reduced)."""
    v, x, c, x_prev, noise = _inputs((2, 4, 8, 8), torch.float32, mode, sde_type)
    grads = []
    for fn in (flow_step_triton, flow_step_reference):
        leaf = v.detach().requires_grad_(True)
        grads.append(torch.autograd.grad(fn(leaf, x, c, x_prev=x_prev, noise=noise).log_pf.sum(), leaf)[0])
    assert_within_reference_error(grads[0], grads[1], grads[1], "grad_v via log_pf")
    assert grads[0].abs().max() > 0


@pytest.mark.parametrize("deterministic", ["noise_zero", "cps_last_step"])
@pytest.mark.parametrize("mode", MODES)
def test_flow_step_deterministic_steps(mode, deterministic):
    """std = 0 steps have no density: log_pf = 0 with zero gradient, finite everywhere, as in the reference."""
    sde_type, noise_level = ("sde", 0.0) if deterministic == "noise_zero" else ("cps", 0.7)
    v, x, c, x_prev, noise = _inputs((4, 4, 8, 8), torch.float32, mode, sde_type, noise_level,
                                     last=deterministic == "cps_last_step")
    outs, grads = [], []
    for fn in (flow_step_triton, flow_step_reference):
        leaf = v.detach().requires_grad_(True)
        out = fn(leaf, x, c, x_prev=x_prev, noise=noise)
        outs.append(out)
        grads.append(torch.autograd.grad(out.log_pf.sum() + out.x0_pred.sum(), leaf)[0])
    _check_outputs(outs[0], outs[1], outs[1])
    assert_within_reference_error(grads[0], grads[1], grads[1], "grad_v")
    zero = (c.std == 0)
    assert zero.any() and (outs[0].log_pf[zero] == 0).all()


def test_flow_step_draws_noise_like_reference():
    v, x, c, _, _ = _inputs((2, 4, 8, 8), torch.bfloat16, "sampling")
    torch.manual_seed(1234)
    out = flow_step_triton(v, x, c)
    torch.manual_seed(1234)
    ref = flow_step_reference(v, x, c)
    _check_outputs(out, ref, ref)


def test_flow_step_is_deterministic_and_rejects_bad_arguments():
    v, x, c, x_prev, _ = _inputs((3, 4, 63, 65), torch.float32, "scoring")
    first = flow_step_triton(v, x, c, x_prev=x_prev, reduce="sum")
    second = flow_step_triton(v, x, c, x_prev=x_prev, reduce="sum")
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    with pytest.raises(ValueError, match="reduce"):
        flow_step_triton(v, x, c, x_prev=x_prev, reduce="max")
    with pytest.raises(ValueError, match="x_prev"):
        flow_step_triton(v, x, c, x_prev=x_prev[:, :2])
