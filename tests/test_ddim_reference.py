"""The DDIM step reference against diffusers and torch.distributions."""
import pytest
import torch
from diffusers import DDIMScheduler

from fastdag.samplers import ddim_step_schedule
from fastdag.kernels import db_residual_reference, ddim_step_reference


def sd_scheduler(**kw) -> DDIMScheduler:
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, **kw)


@pytest.mark.parametrize("step", [0, 7, 19])
def test_eta0_mean_equals_diffusers_prev_sample(step):
    sch = sd_scheduler()
    schedule = ddim_step_schedule(sch, 20, torch.device("cpu"))
    x_t, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = schedule.timesteps[step]
    expected = sch.step(eps, t, x_t, eta=0.0).prev_sample
    b = x_t.shape[0]
    out = ddim_step_reference(eps, x_t, schedule.alpha_t[step].expand(b), schedule.alpha_prev[step].expand(b), 0.0,
                              noise=torch.randn_like(x_t))
    torch.testing.assert_close(out.x_prev, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.x0_pred, sch.step(eps, t, x_t, eta=0.0).pred_original_sample, rtol=1e-5, atol=1e-5)


def test_eta1_sample_equals_diffusers_with_same_noise():
    sch = sd_scheduler()
    schedule = ddim_step_schedule(sch, 10, torch.device("cpu"))
    x_t, eps, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    expected = sch.step(eps, schedule.timesteps[3], x_t, eta=1.0, variance_noise=noise).prev_sample
    out = ddim_step_reference(eps, x_t, schedule.alpha_t[3].expand(2), schedule.alpha_prev[3].expand(2), 1.0, noise=noise)
    torch.testing.assert_close(out.x_prev, expected, rtol=1e-5, atol=1e-5)


def _normal_logprobs(eps, x_t, a_t, a_prev, eta, x_prev, reduce):
    a_t, a_prev = a_t.view(-1, 1, 1, 1), a_prev.view(-1, 1, 1, 1)
    x0 = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).sqrt() * eps
    pf = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(x_prev)
    pb = torch.distributions.Normal((a_t / a_prev).sqrt() * x_prev, (1 - a_t / a_prev).sqrt().expand_as(x_prev)).log_prob(x_t)
    red = (lambda v: v.mean(dim=(1, 2, 3))) if reduce == "mean" else (lambda v: v.sum(dim=(1, 2, 3)))
    return red(pf), red(pb)


@pytest.mark.parametrize("reduce", ["mean", "sum"])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_logprobs_equal_torch_normal(reduce, eta):
    b = 4
    x_t, eps = torch.randn(b, 4, 6, 5, dtype=torch.float64), torch.randn(b, 4, 6, 5, dtype=torch.float64)
    a_t = torch.tensor([0.1, 0.3, 0.6, 0.9], dtype=torch.float64)
    a_prev = a_t + torch.tensor([0.05, 0.1, 0.2, 0.09], dtype=torch.float64)
    out = ddim_step_reference(eps, x_t, a_t, a_prev, eta, noise=torch.randn_like(x_t), reduce=reduce)
    pf, pb = _normal_logprobs(eps, x_t, a_t, a_prev, eta, out.x_prev.double(), reduce)
    torch.testing.assert_close(out.log_pf.double(), pf, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.log_pb.double(), pb, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_recomputed_logprob_of_stored_transition_equals_sampling_value(reduce):
    schedule = ddim_step_schedule(sd_scheduler(), 50, torch.device("cpu"))
    x_t, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    steps = torch.tensor([0, 25, 49])
    a_t, a_prev = schedule.alpha_t[steps], schedule.alpha_prev[steps]
    sampled = ddim_step_reference(eps, x_t, a_t, a_prev, 1.0, reduce=reduce)
    scored = ddim_step_reference(eps, x_t, a_t, a_prev, 1.0, x_prev=sampled.x_prev, reduce=reduce)
    torch.testing.assert_close(scored.log_pf, sampled.log_pf, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(scored.log_pb, sampled.log_pb, rtol=1e-6, atol=1e-6)
    assert torch.equal(scored.x_prev, sampled.x_prev)


def test_zero_sigma_steps_are_finite_and_differentiable():
    # eta = 0 everywhere, and set_alpha_to_one makes the last step's σ zero even with eta = 1.
    sch = DDIMScheduler(set_alpha_to_one=True, clip_sample=False)
    schedule = ddim_step_schedule(sch, 10, torch.device("cpu"))
    assert schedule.alpha_prev[-1] == 1.0
    x_t = torch.randn(2, 4, 8, 8)
    eps = torch.randn(2, 4, 8, 8, requires_grad=True)
    for eta, step in [(0.0, 3), (1.0, 9)]:
        a_t, a_prev = schedule.alpha_t[step].expand(2), schedule.alpha_prev[step].expand(2)
        out = ddim_step_reference(eps, x_t, a_t, a_prev, eta)
        scored = ddim_step_reference(eps, x_t, a_t, a_prev, eta, x_prev=out.x_prev)
        for v in (out.x_prev, out.log_pf, out.log_pb, out.x0_pred, scored.log_pf, scored.log_pb):
            assert torch.isfinite(v).all()
        assert torch.equal(scored.log_pf, torch.zeros(2))
        (scored.log_pf.sum() + scored.x0_pred.sum()).backward()
        assert torch.isfinite(eps.grad).all()
        eps.grad = None


def test_bf16_inputs_compute_in_fp32():
    x_t, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    a_t, a_prev = torch.tensor([0.5, 0.5]), torch.tensor([0.6, 0.6])
    noise = torch.randn_like(x_t)
    lo = ddim_step_reference(eps.bfloat16(), x_t.bfloat16(), a_t, a_prev, 1.0, noise=noise)
    hi = ddim_step_reference(eps.bfloat16().float(), x_t.bfloat16().float(), a_t, a_prev, 1.0, noise=noise)
    assert lo.x_prev.dtype == torch.bfloat16 and lo.log_pf.dtype == torch.float32
    torch.testing.assert_close(lo.log_pf, hi.log_pf)


def test_db_residual():
    f_t, f_p, pf, pb = (torch.randn(5) for _ in range(4))
    torch.testing.assert_close(db_residual_reference(f_t, f_p, pf, pb), f_t + pf - pb - f_p)
