"""ddim_step_triton against ddim_step_reference: forward outputs and ∂/∂eps, both modes, both reductions, σ = 0."""
import os

# Interpreter mode must be chosen before kernels are decorated (tests/conftest.py does the same for the suite).
os.environ.setdefault("TRITON_INTERPRET", "1")

from typing import Optional  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from kernel_testing import (  # noqa: E402
    DEVICE,
    assert_within_reference_error,
    poisoned_outputs_and_seed,  # noqa: F401 (autouse fixture)
    requires_triton,
)

from fastdag.kernels.ddim_step import REDUCTIONS, DDIMStepOutput, ddim_step_reference, ddim_step_triton  # noqa: E402

pytestmark = requires_triton

# Shapes [B, C, H, W]: tiny, odd-sized (D = 105 < one block), and odd across blocks (D = 16380 = 15·1024 + 1020).
SHAPES = [(2, 4, 8, 8), (1, 3, 5, 7), (3, 4, 63, 65)]
DTYPES = [torch.float32, torch.bfloat16]
MODES = ["scoring", "sampling"]


def _alphas(batch: int, sigma_zero: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[B] ᾱ_t < ᾱ_{t−1} at random timesteps; ``sigma_zero`` makes some samples deterministic steps."""
    alpha_t = torch.empty(batch).uniform_(0.05, 0.9)
    alpha_prev = alpha_t + (1 - alpha_t) * torch.empty(batch).uniform_(0.05, 0.5)
    if sigma_zero == "last_step":  # set_alpha_to_one: ᾱ_{t−1} = 1, so σ = 0 but q(x_t | x_{t−1}) has a density
        alpha_prev[::2] = 1.0
    elif sigma_zero == "same_alpha":  # ᾱ_{t−1} = ᾱ_t: σ = 0 and the backward variance is 0 too
        alpha_prev[::2] = alpha_t[::2]
    return alpha_t.to(DEVICE), alpha_prev.to(DEVICE)


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, mode: str, eta: float = 1.0, sigma_zero: Optional[str] = None):
    """(eps, x_t, alpha_t, alpha_prev, x_prev or None, noise or None), fresh per test."""
    eps = torch.randn(shape, device=DEVICE).to(dtype)
    x_t = torch.randn(shape, device=DEVICE).to(dtype)
    alpha_t, alpha_prev = _alphas(shape[0], sigma_zero)
    if mode == "sampling":
        return eps, x_t, alpha_t, alpha_prev, None, torch.randn(shape, device=DEVICE)
    # A next state sampled by a slightly different policy, as in training (θ vs θ_old): a realistic log p_F.
    eps_old = eps.float() + 0.1 * torch.randn(shape, device=DEVICE)
    x_prev = ddim_step_reference(eps_old, x_t.float(), alpha_t, alpha_prev, eta).x_prev.to(dtype)
    return eps, x_t, alpha_t, alpha_prev, x_prev, None


def _upcast(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.float()


def _same(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return t


def _check_outputs(out: DDIMStepOutput, ref32: DDIMStepOutput, ref_lowp: DDIMStepOutput) -> None:
    for name in DDIMStepOutput._fields:
        assert_within_reference_error(getattr(out, name), getattr(ref32, name), getattr(ref_lowp, name), name)
    assert out.x_prev.dtype == ref_lowp.x_prev.dtype and out.x0_pred.dtype == ref_lowp.x0_pred.dtype
    assert out.log_pf.dtype == out.log_pb.dtype == torch.float32


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduce", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_ddim_step_forward(shape, dtype, reduce, mode):
    eps, x_t, a_t, a_prev, x_prev, noise = _inputs(shape, dtype, mode)
    out = ddim_step_triton(eps, x_t, a_t, a_prev, 1.0, x_prev=x_prev, noise=noise, reduce=reduce)
    ref32 = ddim_step_reference(
        eps.float(), x_t.float(), a_t, a_prev, 1.0, x_prev=_upcast(x_prev), noise=noise, reduce=reduce
    )
    ref_lowp = ddim_step_reference(eps, x_t, a_t, a_prev, 1.0, x_prev=x_prev, noise=noise, reduce=reduce)
    _check_outputs(out, ref32, ref_lowp)
    if mode == "scoring":
        assert out.x_prev is x_prev  # a given x_{t−1} is data, returned as is


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduce", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_ddim_step_backward(shape, dtype, reduce, mode):
    eps, x_t, a_t, a_prev, x_prev, noise = _inputs(shape, dtype, mode)
    grad_x0 = torch.randn(shape, device=DEVICE).to(dtype)
    grad_log_pf = torch.randn(shape[0], device=DEVICE)
    grad_log_pb = torch.randn(shape[0], device=DEVICE)

    def grad_eps(fn, eps_in, x_t_in, x_prev_in, grad_x0_in):
        eps_leaf = eps_in.detach().requires_grad_(True)
        out = fn(eps_leaf, x_t_in, a_t, a_prev, 1.0, x_prev=x_prev_in, noise=noise, reduce=reduce)
        assert not out.x_prev.requires_grad and not out.log_pb.requires_grad
        # log_pb carries no θ: its term must not change ∂/∂eps (it is not even differentiable here).
        loss = (out.x0_pred * grad_x0_in).float().sum() + (out.log_pf * grad_log_pf).sum()
        loss = loss + (out.log_pb * grad_log_pb).sum()
        (grad,) = torch.autograd.grad(loss, eps_leaf)
        assert grad.dtype == eps_in.dtype
        return grad

    grad = grad_eps(ddim_step_triton, eps, x_t, x_prev, grad_x0)
    grad32 = grad_eps(ddim_step_reference, eps.float(), x_t.float(), _upcast(x_prev), grad_x0.float())
    grad_lowp = grad_eps(ddim_step_reference, eps, x_t, x_prev, grad_x0)
    assert_within_reference_error(grad, grad32, grad_lowp, "grad_eps")


@pytest.mark.parametrize("used", ["log_pf", "x0_pred"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduce", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ddim_step_backward_one_output(dtype, reduce, mode, used):
    """One output reaches the loss (the other's gradient is None, counted as zero). Alone, the log_pf term is
    checked at its own scale: beside the x0_pred term it sits below bf16 resolution when mean-reduced."""
    eps, x_t, a_t, a_prev, x_prev, noise = _inputs((2, 4, 8, 8), dtype, mode)
    grads = []
    for fn, cast in ((ddim_step_triton, _same), (ddim_step_reference, _upcast), (ddim_step_reference, _same)):
        eps_leaf = cast(eps).detach().requires_grad_(True)
        out = fn(eps_leaf, cast(x_t), a_t, a_prev, 1.0, x_prev=cast(x_prev), noise=noise, reduce=reduce)
        loss = out.log_pf.sum() if used == "log_pf" else out.x0_pred.float().square().sum()
        grads.append(torch.autograd.grad(loss, eps_leaf)[0])
    assert_within_reference_error(*grads, f"grad_eps via {used}")


@pytest.mark.parametrize("sigma_zero", ["eta_zero", "last_step", "same_alpha"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ddim_step_sigma_zero(dtype, mode, sigma_zero):
    """σ = 0 steps are deterministic: log_pf = 0 with zero gradient, finite everywhere, as in the reference."""
    shape = (3, 4, 8, 8)
    eta = 0.0 if sigma_zero == "eta_zero" else 1.0
    eps, x_t, a_t, a_prev, x_prev, noise = _inputs(shape, dtype, mode, eta, None if eta == 0 else sigma_zero)
    grad_x0 = torch.randn(shape, device=DEVICE)
    outs, grads = [], []
    for fn, cast in ((ddim_step_triton, _same), (ddim_step_reference, _upcast), (ddim_step_reference, _same)):
        eps_leaf = cast(eps).detach().requires_grad_(True)
        out = fn(eps_leaf, cast(x_t), a_t, a_prev, eta, x_prev=cast(x_prev), noise=noise, reduce="mean")
        loss = (out.x0_pred.float() * grad_x0).sum() + out.log_pf.sum()
        outs.append(out)
        grads.append(torch.autograd.grad(loss, eps_leaf)[0])
    _check_outputs(*outs)
    assert_within_reference_error(*grads, "grad_eps")
    deterministic = torch.ones(3, dtype=torch.bool) if eta == 0 else torch.tensor([True, False, True])
    assert (outs[0].log_pf[deterministic.to(DEVICE)] == 0).all()
    if sigma_zero == "same_alpha":
        assert (outs[0].log_pb[deterministic.to(DEVICE)] == 0).all()


def test_ddim_step_draws_noise_like_reference():
    """Sampling without noise draws torch.randn_like in fp32 as the reference does: same seed, same x_{t−1}."""
    eps, x_t, a_t, a_prev, _, _ = _inputs((2, 4, 8, 8), torch.bfloat16, "sampling")
    torch.manual_seed(1234)
    out = ddim_step_triton(eps, x_t, a_t, a_prev, 1.0)
    torch.manual_seed(1234)
    ref = ddim_step_reference(eps, x_t, a_t, a_prev, 1.0)
    _check_outputs(out, ref, ref)


def test_ddim_step_layouts_and_broadcast_alphas():
    """Non-contiguous inputs (a CFG half, a transposed view) and one ᾱ for the whole batch, as the reference takes."""
    cfg = torch.randn(4, 4, 8, 8, device=DEVICE)
    eps = cfg[2:]  # conditional half of a CFG batch
    x_t = torch.randn(2, 4, 8, 8, device=DEVICE).transpose(2, 3)
    x_prev = torch.randn(2, 4, 8, 8, device=DEVICE)
    alpha_t, alpha_prev = torch.tensor(0.3, device=DEVICE), torch.tensor([0.5], device=DEVICE)
    out = ddim_step_triton(eps, x_t, alpha_t, alpha_prev, 1.0, x_prev=x_prev, reduce="sum")
    ref = ddim_step_reference(eps, x_t, alpha_t, alpha_prev, 1.0, x_prev=x_prev, reduce="sum")
    _check_outputs(out, ref, ref)


def test_ddim_step_is_deterministic():
    eps, x_t, a_t, a_prev, x_prev, _ = _inputs((3, 4, 63, 65), torch.float32, "scoring")
    first = ddim_step_triton(eps, x_t, a_t, a_prev, 1.0, x_prev=x_prev, reduce="sum")
    second = ddim_step_triton(eps, x_t, a_t, a_prev, 1.0, x_prev=x_prev, reduce="sum")
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_ddim_step_rejects_bad_arguments():
    eps, x_t, a_t, a_prev, x_prev, _ = _inputs((2, 4, 8, 8), torch.float32, "scoring")
    with pytest.raises(ValueError, match="reduce"):
        ddim_step_triton(eps, x_t, a_t, a_prev, 1.0, x_prev=x_prev, reduce="max")
    with pytest.raises(ValueError, match="x_prev"):
        ddim_step_triton(eps, x_t, a_t, a_prev, 1.0, x_prev=x_prev[:, :2])
    with pytest.raises(ValueError, match="alpha_t"):
        ddim_step_triton(eps, x_t, a_t.repeat(2), a_prev, 1.0, x_prev=x_prev)
