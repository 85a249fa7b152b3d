"""DDIM (η from 0 to 1) on a diffusers ``DDIMScheduler``'s noise schedule: the UNet families' sampler.

The step math and its log-densities live in ``fastdag.kernels.ddim_step`` (the PyTorch reference and its Triton
twin); this module precomputes the schedule on the device and binds the settings every step needs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from fastdag import kernels
from fastdag.config import ConfigError
from fastdag.kernels.ddim_step import DDIMStepOutput, predict_x0_eps


def ddim_scheduler_from(scheduler):
    """DDIM with the base scheduler's training noise schedule (the sampler the paper uses)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(scheduler.config)


def step_settings(config) -> tuple[str, Optional[float]]:
    """(prediction_type, clip range or None) of a DDIM scheduler config; settings the step math does not implement
    are a one-line ConfigError (checked when the model loads, before anything is sampled)."""
    from fastdag.kernels.ddim_step import PREDICTION_TYPES

    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"model.pretrained: the scheduler's prediction_type {prediction_type!r} is not supported; "
                          f"fastdag's DDIM step implements {', '.join(PREDICTION_TYPES)}")
    if config.get("thresholding", False):
        raise ConfigError("model.pretrained: the scheduler sets thresholding=True (dynamic thresholding of x̂_0), "
                          "which fastdag's DDIM step does not implement; use a scheduler config without it")
    clip = float(config.get("clip_sample_range", 1.0)) if config.get("clip_sample", False) else None
    return prediction_type, clip


@dataclass
class StepSchedule:
    """The DDIM steps of one trajectory, precomputed on the device so the hot loop never touches the host.

    Step i goes from x_{t_i} to x_{t_{i+1}}: ``timesteps[i]`` = t_i, ``alpha_t[i]`` = ᾱ_{t_i}, ``alpha_prev[i]`` =
    ᾱ at diffusers' previous timestep (``final_alpha_cumprod`` past 0). All [T].
    """

    timesteps: torch.Tensor  # [T] long
    alpha_t: torch.Tensor  # [T] fp32
    alpha_prev: torch.Tensor  # [T] fp32

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    def score_scale(self, eta: float, prediction_type: str = "epsilon") -> torch.Tensor:
        """[T] |∂μ_θ/∂o| / σ_t: how strongly step i's log p_θ(x_{t-1} | x_t) reacts to the model output o
        (∂ log p_θ / ∂o = z · this, z the step's standard-normal noise; x̂_0's clip, where a model has one, is
        ignored). For ε̂-prediction about 0.6–0.9 on most of a 20-step SD schedule but 5.4 at its second-to-last
        step, where σ_t collapses; NaN where σ_t = 0 (no density)."""
        a, ap = self.alpha_t, self.alpha_prev
        sigma = eta * ((1 - ap) / (1 - a)).sqrt() * (1 - a / ap).sqrt()
        direction = (1 - ap - sigma**2).clamp_min(0).sqrt()
        # ∂x̂_0/∂o and ∂ε̂/∂o of fastdag.kernels.ddim_step.predict_x0_eps; μ = √ᾱ_{t−1} x̂_0 + direction · ε̂
        d_x0, d_eps = {
            "epsilon": (-(1 - a).sqrt() / a.sqrt(), torch.ones_like(a)),
            "v_prediction": (-(1 - a).sqrt(), a.sqrt()),
            "sample": (torch.ones_like(a), -a.sqrt() / (1 - a).sqrt()),
        }[prediction_type]
        dmu = ap.sqrt() * d_x0 + direction * d_eps
        return torch.where(sigma > 0, dmu.abs() / sigma, torch.full_like(sigma, float("nan")))


def ddim_step_schedule(scheduler, num_steps: int, device: torch.device) -> StepSchedule:
    scheduler.set_timesteps(num_steps)
    timesteps = scheduler.timesteps.to(torch.long)
    prev = timesteps - scheduler.config.num_train_timesteps // num_steps
    alphas = scheduler.alphas_cumprod.to(torch.float32)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32)
    alpha_prev = torch.where(prev >= 0, alphas[prev.clamp_min(0)], final)
    return StepSchedule(timesteps.to(device), alphas[timesteps].to(device), alpha_prev.to(device))


class DDIMSampler:
    """DDIM with η on a :class:`StepSchedule`; the model output is in the scheduler's ``prediction_type``."""

    def __init__(self, schedule: StepSchedule, eta: float, *, reduce: str = "mean", backend: str = "auto",
                 prediction_type: str = "epsilon", clip_sample_range: Optional[float] = None):
        self.schedule, self.eta, self.reduce, self.backend = schedule, eta, reduce, backend
        self.prediction_type, self.clip_sample_range = prediction_type, clip_sample_range

    @property
    def timesteps(self) -> torch.Tensor:
        return self.schedule.timesteps

    @property
    def num_steps(self) -> int:
        return self.schedule.num_steps

    def step(self, output: torch.Tensor, x: torch.Tensor, steps: torch.Tensor, *, x_prev: Optional[torch.Tensor] = None,
             noise: Optional[torch.Tensor] = None) -> DDIMStepOutput:
        """x_t -> x_{t-1} at ``steps`` [B]: sampled with ``noise``, or ``x_prev`` scored (see ddim_step_reference)."""
        s = self.schedule
        return kernels.ddim_step(output, x, s.alpha_t[steps], s.alpha_prev[steps], self.eta, x_prev=x_prev,
                                 noise=noise, reduce=self.reduce, prediction_type=self.prediction_type,
                                 clip_sample_range=self.clip_sample_range, backend=self.backend)

    def xhat0(self, output: torch.Tensor, x: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """x̂_0 fp32, unclipped, as the official code's forward-looking x̂_0 (``pred_orig_latent``)."""
        return predict_x0_eps(output, x, self.schedule.alpha_t[steps], self.prediction_type)[0]

    def score_scale(self) -> torch.Tensor:
        return self.schedule.score_scale(self.eta, self.prediction_type)
