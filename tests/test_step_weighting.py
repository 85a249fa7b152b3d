"""dag.step_weighting: the per-step score scale is the log-prob's true sensitivity to ε̂, and the weights undo it."""
import pytest
import torch

from fastdag.samplers import ddim_step_schedule, step_weights
from fastdag.families.presets import sd15_ddim_scheduler
from fastdag.kernels.ddim_step import ddim_step_reference


def schedule(num_steps=20):
    return ddim_step_schedule(sd15_ddim_scheduler(), num_steps, torch.device("cpu"))


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_score_scale_is_the_gradient_of_log_pf_per_unit_noise(eta):
    """∂ log p_θ(x_{t-1} | x_t) / ∂ε̂ = −z · score_scale elementwise (sum reduction), for every step."""
    s = schedule()
    T = s.num_steps
    torch.manual_seed(0)
    x_t, z = torch.randn(T, 4, 3, 3), torch.randn(T, 4, 3, 3)
    eps = torch.randn(T, 4, 3, 3, requires_grad=True)
    sample = ddim_step_reference(eps.detach(), x_t, s.alpha_t, s.alpha_prev, eta, noise=z)
    out = ddim_step_reference(eps, x_t, s.alpha_t, s.alpha_prev, eta, x_prev=sample.x_prev, reduce="sum")
    (grad,) = torch.autograd.grad(out.log_pf.sum(), eps)
    expected = -z * s.score_scale(eta).view(-1, 1, 1, 1)
    torch.testing.assert_close(grad, expected, rtol=1e-3, atol=1e-4)


def test_score_scale_weights():
    s = schedule()
    w = step_weights(s.score_scale(1.0), "score_scale")
    assert w.shape == (20,) and torch.all(w > 0) and w.mean().item() == pytest.approx(1.0)
    # the second-to-last step of a 20-step SD schedule is the one whose gradient would dominate
    assert w.argmin().item() == 18 and w[18] < 0.25 * w.median()
    assert step_weights(s.score_scale(1.0), "uniform") is None
    assert step_weights(s.score_scale(0.0), "score_scale") is None  # deterministic steps: no density, nothing to weigh
