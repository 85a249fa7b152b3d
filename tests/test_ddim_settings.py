"""The DDIM step for every DDIMScheduler setting a diffusers model may carry: prediction_type (epsilon,
v_prediction, sample) x clip_sample (off, range 1, range 0.5), against ``DDIMScheduler.step`` (η = 0, and η = 1
with the same noise), against the official code's log-prob formula (written out here, independently of the code
under test), the Triton twin against the reference, and a whole η = 0 rollout of the tiny DDPM against diffusers'
own sampling loop. Settings the step does not implement (thresholding) are refused with one line."""
import math
from typing import Optional

import pytest
import torch
from diffusers import DDIMScheduler
from kernel_testing import DEVICE, requires_triton

from fastdag.config import ConfigError, LoraConfig, ModelConfig
from fastdag.families import build_model
from fastdag.samplers import ddim_step_schedule, step_settings
from fastdag.kernels.ddim_step import PREDICTION_TYPES, ddim_step_reference, ddim_step_triton

CLIPS = [None, 1.0, 0.5]
STEPS = [0, 6, 9]  # first, middle and last of 10 (the last uses final_alpha_cumprod)


def scheduler(prediction_type: str, clip: Optional[float]) -> DDIMScheduler:
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False,
                         steps_offset=1, prediction_type=prediction_type, clip_sample=clip is not None,
                         clip_sample_range=1.0 if clip is None else clip)


def inputs(step: int, sch: DDIMScheduler, b: int = 3):
    schedule = ddim_step_schedule(sch, 10, torch.device("cpu"))
    # x_t at the step's noise level, and a model output scaled so that x̂_0 leaves [-1, 1] often (the clip acts)
    x_t, out, noise = torch.randn(b, 4, 6, 5), 1.5 * torch.randn(b, 4, 6, 5), torch.randn(b, 4, 6, 5)
    a_t, a_prev = schedule.alpha_t[step].expand(b), schedule.alpha_prev[step].expand(b)
    return schedule.timesteps[step], x_t, out, noise, a_t, a_prev


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_step_equals_diffusers(prediction_type, clip, step):
    sch = scheduler(prediction_type, clip)
    assert step_settings(sch.config) == (prediction_type, clip)
    t, x_t, out, noise, a_t, a_prev = inputs(step, sch)
    kw = dict(prediction_type=prediction_type, clip_sample_range=clip)
    for eta in (0.0, 1.0):
        expected = sch.step(out, t, x_t, eta=eta, variance_noise=noise)
        ours = ddim_step_reference(out, x_t, a_t, a_prev, eta, noise=noise, **kw)
        torch.testing.assert_close(ours.x_prev, expected.prev_sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.x0_pred, expected.pred_original_sample, rtol=1e-5, atol=1e-5)
        # a stored transition is scored with the same mean: its log-density is that of the sampled noise
        scored = ddim_step_reference(out, x_t, a_t, a_prev, eta, x_prev=expected.prev_sample, **kw)
        torch.testing.assert_close(scored.log_pf, ours.log_pf, rtol=1e-4, atol=1e-4)
    if clip is not None and prediction_type != "sample":
        unclipped = ddim_step_reference(out, x_t, a_t, a_prev, 1.0, noise=noise, prediction_type=prediction_type)
        assert not torch.allclose(unclipped.x_prev, ours.x_prev), "the clip never acted: the test proves nothing"


def official_log_prob(sch: DDIMScheduler, out, t, x_t, x_prev, eta):
    """The official helper's formula (alignment/diffusers_patch/ddim_with_logprob.py), mean over dims."""
    prev_t = max(0, t - sch.config.num_train_timesteps // sch.num_inference_steps)
    a_t = sch.alphas_cumprod[t]
    a_prev = sch.alphas_cumprod[prev_t] if t - sch.config.num_train_timesteps // sch.num_inference_steps >= 0 \
        else sch.final_alpha_cumprod
    b_t = 1 - a_t
    if sch.config.prediction_type == "epsilon":
        x0, e = (x_t - b_t**0.5 * out) / a_t**0.5, out
    elif sch.config.prediction_type == "sample":
        x0 = out
        e = (x_t - a_t**0.5 * x0) / b_t**0.5
    else:
        x0 = a_t**0.5 * x_t - b_t**0.5 * out
        e = a_t**0.5 * out + b_t**0.5 * x_t
    if sch.config.clip_sample:
        x0 = x0.clamp(-sch.config.clip_sample_range, sch.config.clip_sample_range)
    std = eta * (((1 - a_prev) / b_t) * (1 - a_t / a_prev)) ** 0.5
    mean = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * e
    lp = -((x_prev - mean) ** 2) / (2 * std**2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    return lp.mean(dim=(1, 2, 3))


@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_log_prob_of_a_diffusers_sampled_transition_equals_the_official_formula(prediction_type, clip):
    sch = scheduler(prediction_type, clip)
    step = 4
    t, x_t, out, noise, a_t, a_prev = inputs(step, sch)
    x_prev = sch.step(out, t, x_t, eta=1.0, variance_noise=noise).prev_sample  # sampled by diffusers
    policy = out + 0.05 * torch.randn_like(out)  # scored by a slightly different policy, as in training
    ours = ddim_step_reference(policy, x_t, a_t, a_prev, 1.0, x_prev=x_prev, prediction_type=prediction_type,
                               clip_sample_range=clip)
    expected = official_log_prob(sch, policy, int(t), x_t, x_prev, 1.0)
    torch.testing.assert_close(ours.log_pf, expected.float(), rtol=1e-5, atol=1e-5)


@requires_triton
@pytest.mark.parametrize("mode", ["scoring", "sampling"])
@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_triton_twin_matches_reference_with_gradients(prediction_type, clip, mode):
    """On the device the kernel tests share (tests/kernel_testing.py): CUDA for compiled Triton, else the CPU."""
    sch = scheduler(prediction_type, clip)
    t, *tensors = inputs(5, sch)
    x_t, out, noise, a_t, a_prev = (x.to(DEVICE) for x in tensors)
    x_prev = ddim_step_reference(out, x_t, a_t, a_prev, 1.0, noise=noise).x_prev if mode == "scoring" else None
    kw = dict(x_prev=x_prev, noise=None if x_prev is not None else noise, prediction_type=prediction_type,
              clip_sample_range=clip)
    grads, outs = [], []
    for fn in (ddim_step_reference, ddim_step_triton):
        o = out.clone().requires_grad_(True)
        res = fn(o, x_t, a_t, a_prev, 1.0, **kw)
        weights = torch.linspace(-1, 1, res.x0_pred.numel(), device=DEVICE).view_as(x_t)
        (res.log_pf.sum() + (res.x0_pred * weights).sum()).backward()
        grads.append(o.grad)
        outs.append(res)
    for name in ("x_prev", "log_pf", "log_pb", "x0_pred"):
        torch.testing.assert_close(getattr(outs[1], name), getattr(outs[0], name), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_tiny_ddpm_rollout_at_eta0_equals_diffusers_sampling_loop():
    from fastdag.rollout import generate_images

    model, _ = build_model(ModelConfig(pretrained="tiny-random-ddpm", device="cpu"), LoraConfig())
    assert model.clip_sample_range == 1.0  # the preset clips x̂_0, as the paper's CIFAR-10 DDPM
    steps = 10
    from fastdag.config import SampleConfig

    sampler = model.make_sampler(steps, SampleConfig(eta=0.0), backend="reference")
    gen = torch.Generator().manual_seed(3)
    x_T = torch.randn((2, *model.latent_shape), generator=torch.Generator().manual_seed(3))
    ours = generate_images(model, sampler, ["", ""], guidance_scale=1.0, uncond=None, generator=gen)
    sch = DDIMScheduler.from_config(model.scheduler.config)
    sch.set_timesteps(steps)
    x = x_T.clone()
    with torch.no_grad():
        for t in sch.timesteps:
            x = sch.step(model.unet(x, t).sample, t, x, eta=0.0).prev_sample
    expected = (x / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_thresholding_and_unknown_prediction_types_are_refused():
    with pytest.raises(ConfigError, match="thresholding"):
        step_settings(DDIMScheduler(thresholding=True).config)
    with pytest.raises(ConfigError, match="prediction_type 'flow'"):
        step_settings({"prediction_type": "flow"})
