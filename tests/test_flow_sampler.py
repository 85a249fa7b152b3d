"""The rectified-flow sampler against independent formulas: Flow-GRPO's SDE log-prob and CPS in float64 NumPy, the
backward kernel p_B composing to the marginals N((1−σ) x₀, σ² I) (closed form and Monte Carlo), noise level 0 as
``FlowMatchEulerDiscreteScheduler.step``, and the DB residual of a hand-built consistent flow."""
import math

import numpy as np
import pytest
import torch

from fastdag.kernels import db_residual_reference
from fastdag.kernels.flow_step import FlowCoefficients, flow_step_coefficients, flow_step_reference
from fastdag.samplers import FlowSampler, flow_sigmas

SIGMAS = np.array([1.0, 0.9, 0.75, 0.5, 0.3, 0.1, 0.0])


def flow_grpo_sde_numpy(v, x, x_next, sigma, sigma_next, a, sigma_max):
    """flow_grpo/diffusers_patch/sd3_sde_with_logprob.py in float64, mean-reduced log-prob."""
    dt = sigma_next - sigma
    std_dev_t = np.sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma))) * a
    mean = x * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    std = std_dev_t * np.sqrt(-dt)
    log_prob = -((x_next - mean) ** 2) / (2 * std**2) - np.log(std) - np.log(np.sqrt(2 * np.pi))
    return mean, std, log_prob.mean()


def gaussian_numpy(x, mean, std):
    return (-((x - mean) ** 2) / (2 * std**2) - np.log(std) - 0.5 * np.log(2 * np.pi)).mean()


@pytest.mark.parametrize("step", range(len(SIGMAS) - 1))
def test_sde_log_prob_and_log_pb_equal_the_float64_formulas(step):
    rng = np.random.default_rng(step)
    sigma, sigma_next, a = SIGMAS[step], SIGMAS[step + 1], 0.7
    v, x, noise = rng.standard_normal((3, 2, 4, 5, 5))
    c = flow_step_coefficients(torch.tensor(SIGMAS[:-1]), torch.tensor(SIGMAS[1:]), a, "sde", sigma_max=SIGMAS[1])
    mean, std, _ = flow_grpo_sde_numpy(v, x, 0, sigma, sigma_next, a, SIGMAS[1])
    x_next = mean + std * noise
    out = flow_step_reference(torch.tensor(v), torch.tensor(x), c.at(torch.tensor([step, step])),
                              x_prev=torch.tensor(x_next, dtype=torch.float32))
    for i in range(2):
        expected_pf = flow_grpo_sde_numpy(v[i], x[i], x_next[i], sigma, sigma_next, a, SIGMAS[1])[2]
        b = (1 - sigma) / (1 - sigma_next)  # p_B: N(b x_σ′, σ² − b² σ′²)
        expected_pb = gaussian_numpy(x[i], b * x_next[i], math.sqrt(sigma**2 - b**2 * sigma_next**2))
        assert out.log_pf[i].item() == pytest.approx(expected_pf, rel=1e-5, abs=1e-5)
        assert out.log_pb[i].item() == pytest.approx(expected_pb, rel=1e-5, abs=1e-5)
        np.testing.assert_allclose(out.x0_pred[i].numpy(), x[i] - sigma * v[i], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("step", range(len(SIGMAS) - 1))
def test_cps_mean_and_std_equal_the_formula(step):
    rng = np.random.default_rng(10 + step)
    sigma, sigma_next, a = SIGMAS[step], SIGMAS[step + 1], 0.7
    v, x, noise = rng.standard_normal((3, 1, 3, 4, 4))
    s = sigma_next * math.sin(a * math.pi / 2)
    x0, eps = x - sigma * v, x + (1 - sigma) * v
    expected = (1 - sigma_next) * x0 + math.sqrt(sigma_next**2 - s**2) * eps + s * noise
    c = flow_step_coefficients(torch.tensor(SIGMAS[:-1]), torch.tensor(SIGMAS[1:]), a, "cps").at(torch.tensor([step]))
    out = flow_step_reference(torch.tensor(v), torch.tensor(x), c, noise=torch.tensor(noise))
    np.testing.assert_allclose(out.x_prev.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert c.std.item() == pytest.approx(s, abs=1e-7)


def test_backward_kernel_composes_to_the_marginals_closed_form():
    """x₀ -> x_σ1 -> ... through q(x_σ | x_σ′) = N(b x_σ′, σ² − b²σ′²): mean (1−σ) x₀, variance σ², at every σ."""
    sigmas = torch.tensor(SIGMAS[::-1].copy())  # 0 = data first, then up to 1
    c = flow_step_coefficients(sigmas[1:], sigmas[:-1], 0.7, "sde")  # step σ -> σ′ run backwards: σ′ = sigmas[k]
    mean_coef, variance = 1.0, 0.0
    for k in range(len(sigmas) - 1):
        b, std_b = c.b[k].double().item(), c.std_b[k].double().item()
        mean_coef, variance = b * mean_coef, b**2 * variance + std_b**2
        sigma = sigmas[k + 1].item()
        assert mean_coef == pytest.approx(1 - sigma, abs=1e-6)
        assert variance == pytest.approx(sigma**2, abs=1e-6)


def test_backward_kernel_composes_to_the_marginals_monte_carlo():
    gen = torch.Generator().manual_seed(0)
    n, x0 = 200_000, torch.tensor([1.5, -0.5, 0.0])
    sigmas = torch.tensor(SIGMAS[::-1].copy())
    c = flow_step_coefficients(sigmas[1:], sigmas[:-1], 0.7, "sde")
    x = x0.expand(n, 3).clone()
    for k in range(len(sigmas) - 1):
        x = c.b[k] * x + c.std_b[k] * torch.randn(x.shape, generator=gen)
        sigma = sigmas[k + 1].item()
        torch.testing.assert_close(x.mean(0), (1 - sigma) * x0, atol=0.01, rtol=0)
        torch.testing.assert_close(x.var(0), torch.full((3,), sigma**2), atol=0.01, rtol=0.01)


def test_db_residual_is_zero_for_a_hand_built_consistent_flow():
    """Gaussian data x₀ ~ N(0, s²): the marginals p_σ = N(0, (1−σ)² s² + σ²) are known, and the exact reverse of
    the backward kernel, p_F(x′ | x) ∝ p_σ′(x′) q(x | x′), is Gaussian. With F = p_σ the detailed balance
    F(x) p_F(x′|x) = F(x′) p_B(x|x′) holds exactly: δ = 0 for every transition, summed log-densities."""
    s2, d = 0.6, 4 * 3 * 3
    sigmas = torch.tensor(SIGMAS)
    c = flow_step_coefficients(sigmas[:-1], sigmas[1:], 0.7, "sde")
    gen = torch.Generator().manual_seed(1)
    for k in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[k].item(), sigmas[k + 1].item()
        var, var_next = (1 - sigma) ** 2 * s2 + sigma**2, (1 - sigma_next) ** 2 * s2 + sigma_next**2
        b, std_b = c.b[k].double().item(), c.std_b[k].double().item()
        precision = 1 / var_next + b**2 / std_b**2
        post_coef, post_std = (b / std_b**2) / precision, math.sqrt(1 / precision)
        x = math.sqrt(var) * torch.randn(5, 4, 3, 3, generator=gen, dtype=torch.float64)
        x_next = post_coef * x + post_std * torch.randn(x.shape, generator=gen, dtype=torch.float64)
        exact = FlowCoefficients(*(torch.full((5,), val) for val in (post_coef, 0.0, post_std, -sigma, b, std_b)))
        out = flow_step_reference(torch.zeros_like(x), x.float(), exact, x_prev=x_next.float(), reduce="sum")
        log_f = lambda z, v: -(z.double() ** 2).flatten(1).sum(1) / (2 * v) - 0.5 * d * math.log(2 * math.pi * v)  # noqa: E731
        delta = db_residual_reference(log_f(x.float(), var), log_f(x_next.float(), var_next), out.log_pf, out.log_pb)
        assert delta.abs().max().item() < 1e-3, (k, delta)
        # and a wrong backward kernel (DDIM's, say) would not balance
        wrong = db_residual_reference(log_f(x.float(), var), log_f(x_next.float(), var_next), out.log_pf,
                                      out.log_pb + 0.5)
        assert wrong.abs().min().item() > 0.4


@pytest.mark.parametrize("dynamic", [False, True])
def test_noise_zero_step_is_the_schedulers_euler_step(dynamic):
    from diffusers import FlowMatchEulerDiscreteScheduler

    kw = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15) if dynamic else {}
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, **kw)
    sigmas = flow_sigmas(scheduler, 8, image_seq_len=1024, sigmas=np.linspace(1, 1 / 8, 8).tolist() if dynamic else None)
    sampler = FlowSampler(sigmas, 0.0, backend="reference")
    x = torch.randn(2, 4, 8, 8)
    reference = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    if dynamic:
        reference.set_timesteps(sigmas=np.linspace(1, 1 / 8, 8).tolist(), mu=sigmas_mu(scheduler, 1024))
    else:
        reference.set_timesteps(8)
    torch.testing.assert_close(reference.sigmas, sampler.sigmas, rtol=0, atol=0)
    for i, t in enumerate(reference.timesteps):
        v = torch.randn_like(x)
        ours = sampler.step(v, x, torch.full((2,), i)).x_prev
        theirs = reference.step(v, t, x).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        assert sampler.timesteps[i].item() == pytest.approx(t.item(), rel=1e-6)
        x = theirs


def sigmas_mu(scheduler, image_seq_len: int) -> float:
    """diffusers' calculate_shift, written out."""
    c = scheduler.config
    m = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len)
    return image_seq_len * m + c.base_shift - m * c.base_image_seq_len


def test_score_scale_is_the_log_prob_gradient_scale():
    """∂ log p_F / ∂v̂ = z · score_scale / D (mean reduction) for a sampled step, z its standard-normal noise."""
    sampler = FlowSampler(torch.tensor(SIGMAS, dtype=torch.float32), 0.7, backend="reference")
    steps = torch.arange(6)
    v = torch.randn(6, 2, 3, 3, requires_grad=True)
    x, z = torch.randn(6, 2, 3, 3), torch.randn(6, 2, 3, 3)
    x_next = sampler.step(v.detach(), x, steps, noise=z).x_prev
    grad = torch.autograd.grad(sampler.step(v, x, steps, x_prev=x_next).log_pf.sum(), v)[0]
    sign = torch.sign(sampler.coefficients.c_v).view(-1, 1, 1, 1)
    torch.testing.assert_close(grad, sign * z * sampler.score_scale().view(-1, 1, 1, 1) / 18, rtol=1e-3, atol=1e-5)
