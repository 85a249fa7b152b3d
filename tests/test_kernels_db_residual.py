"""db_residual / db_loss / rloo_advantages: the Triton twins against their references, forward and gradients."""
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

from fastdag.kernels.db_residual import (  # noqa: E402
    db_loss_reference,
    db_loss_triton,
    db_residual_reference,
    db_residual_triton,
    rloo_advantages_reference,
    rloo_advantages_triton,
)

pytestmark = requires_triton

# Minibatch sizes: one transition, tiny, odd, and odd across two blocks of 1024.
BATCHES = [1, 8, 37, 1029]
DTYPES = [torch.float32, torch.bfloat16]
INPUT_NAMES = ("log_flow_t", "log_flow_prev", "log_pf", "log_pb")


def _transitions(batch: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """Four [B] inputs at realistic scales (log-flows ~ β·r, log-probs ~ mean-reduced Gaussians), fresh per test."""
    scales = (30.0, 30.0, 2.0, 2.0)
    return [(s * torch.randn(batch, device=DEVICE)).to(dtype) for s in scales]


def _leaves(inputs: list[torch.Tensor], upcast: bool = False) -> list[torch.Tensor]:
    return [(t.float() if upcast else t).detach().requires_grad_(True) for t in inputs]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", BATCHES)
def test_db_residual(batch, dtype):
    inputs = _transitions(batch, dtype)
    grad_residual = torch.randn(batch, device=DEVICE)
    results = []
    for fn, upcast in ((db_residual_triton, False), (db_residual_reference, True), (db_residual_reference, False)):
        leaves = _leaves(inputs, upcast)
        residual = fn(*leaves)
        grads = torch.autograd.grad((residual * grad_residual).sum(), leaves)
        results.append((residual, grads))
    (residual, grads), (residual32, grads32), (residual_lowp, grads_lowp) = results
    assert residual.dtype == torch.float32
    assert_within_reference_error(residual, residual32, residual_lowp, "residual")
    for name, g, g32, g_lowp in zip(INPUT_NAMES, grads, grads32, grads_lowp):
        assert g.dtype == dtype
        assert_within_reference_error(g, g32, g_lowp, f"grad {name}")


@pytest.mark.parametrize("through", ["loss", "residual_and_loss"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", BATCHES)
def test_db_loss(batch, dtype, through):
    inputs = _transitions(batch, dtype)
    grad_residual = torch.randn(batch, device=DEVICE)
    results = []
    for fn, upcast in ((db_loss_triton, False), (db_loss_reference, True), (db_loss_reference, False)):
        leaves = _leaves(inputs, upcast)
        residual, loss = fn(*leaves)
        objective = 0.7 * loss + ((residual * grad_residual).sum() if through == "residual_and_loss" else 0.0)
        results.append((residual, loss, torch.autograd.grad(objective, leaves)))
    (residual, loss, grads), (residual32, loss32, grads32), (residual_lowp, loss_lowp, grads_lowp) = results
    assert loss.shape == () and loss.dtype == torch.float32
    assert_within_reference_error(residual, residual32, residual_lowp, "residual")
    assert_within_reference_error(loss, loss32, loss_lowp, "loss")
    for name, g, g32, g_lowp in zip(INPUT_NAMES, grads, grads32, grads_lowp):
        assert_within_reference_error(g, g32, g_lowp, f"grad {name}")


def test_db_residual_mixed_dtypes_and_partial_grads():
    """bf16 flows with fp32 log-probs (a detached log p_F as in DAG-KL): grads only where asked, each in its dtype."""
    log_flow_t, log_flow_prev, log_pf, log_pb = _transitions(37, torch.float32)
    log_flow_t = log_flow_t.to(torch.bfloat16).requires_grad_(True)
    log_flow_prev = log_flow_prev.to(torch.bfloat16).requires_grad_(True)
    for fn in (db_residual_triton, db_residual_reference):
        residual = fn(log_flow_t, log_flow_prev, log_pf, log_pb)
        g_t, g_prev = torch.autograd.grad(residual.sum(), (log_flow_t, log_flow_prev))
        assert g_t.dtype == torch.bfloat16 and torch.equal(g_t, torch.ones_like(g_t))
        assert torch.equal(g_prev, -torch.ones_like(g_prev))


def test_db_residual_rejects_mismatched_shapes():
    inputs = _transitions(8, torch.float32)
    with pytest.raises(ValueError, match=r"\[B\]"):
        db_residual_triton(inputs[0], inputs[1][:4], inputs[2], inputs[3])
    with pytest.raises(ValueError, match=r"\[B\]"):
        db_loss_triton(inputs[0].view(2, 4), *inputs[1:])


@pytest.mark.parametrize("normaliser", ["official", "loo_std"])
@pytest.mark.parametrize("adv_clip", [5.0, 0.5])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [3, 8, 37, 1029])
def test_rloo_advantages(batch, dtype, adv_clip, normaliser):
    a = (10.0 * torch.randn(batch, device=DEVICE) + 3.0).to(dtype).requires_grad_(True)
    advantages = rloo_advantages_triton(a, adv_clip, normaliser)
    ref32 = rloo_advantages_reference(a.float(), adv_clip, normaliser)
    ref_lowp = rloo_advantages_reference(a, adv_clip, normaliser)
    assert advantages.dtype == torch.float32 and not advantages.requires_grad
    assert_within_reference_error(advantages, ref32, ref_lowp, "advantages")
    assert advantages.abs().max() <= adv_clip


def test_rloo_advantages_degenerate_batches():
    """Equal returns give 0 (no NaN); one outlier among equal others is clipped, the others are not."""
    equal = torch.full((6,), 2.5, device=DEVICE)
    assert torch.equal(rloo_advantages_triton(equal, 5.0), torch.zeros(6, device=DEVICE))
    outlier = torch.tensor([0.0, 0.0, 0.0, 0.0, 10.0], device=DEVICE)
    advantages = rloo_advantages_triton(outlier, 5.0, "loo_std")
    reference = rloo_advantages_reference(outlier, 5.0, "loo_std")
    assert_within_reference_error(advantages, reference, reference, "advantages")
    assert advantages[-1] == 5.0
    with pytest.raises(ValueError, match="B >= 3"):
        rloo_advantages_triton(torch.randn(2, device=DEVICE), 5.0)
    with pytest.raises(ValueError, match="B >= 3"):
        rloo_advantages_reference(torch.randn(2, device=DEVICE), 5.0)


def official_rloo(a: torch.Tensor, adv_clip: float) -> torch.Tensor:
    """scripts/train_gfn.py of the official code, line for line."""
    reward_db = a.double()
    rloo_baseline = (reward_db.sum() - reward_db) / (len(reward_db) - 1)
    reward_ = (reward_db - rloo_baseline) ** 2
    rloo_var = (reward_.sum() - reward_) / (len(reward_db) - 1)
    advantages = (reward_db - rloo_baseline) / (rloo_var.sqrt() + 1e-8)
    return torch.clamp(advantages, -adv_clip, adv_clip)


@pytest.mark.parametrize("batch", [3, 4, 8, 33])
def test_rloo_official_normaliser_is_the_official_formula(batch):
    a = 4.0 * torch.randn(batch, device=DEVICE) - 1.0
    expected = official_rloo(a, 5.0).float()
    torch.testing.assert_close(rloo_advantages_reference(a, 5.0), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rloo_advantages_triton(a, 5.0), expected, rtol=1e-5, atol=1e-5)
    # the other normaliser is a different function (larger advantages), so the check above can fail
    other = rloo_advantages_reference(a, 50.0, "loo_std").abs()
    assert (other > official_rloo(a, 50.0).float().abs() * 1.01).all()
