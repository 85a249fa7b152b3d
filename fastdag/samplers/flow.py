"""Rectified-flow SDE samplers with log-probs (Flow-GRPO's SDE and coefficients-preserving sampling): the
flow-matching families' (SD3 / SD3.5, FLUX) sampler, on their ``FlowMatchEulerDiscreteScheduler``'s sigmas.

The step math lives in ``fastdag.kernels.flow_step`` (the PyTorch reference and its Triton twin); this module
precomputes the per-step coefficients on the device and binds the settings every step needs.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from fastdag import kernels
from fastdag.kernels.flow_step import FlowStepOutput, flow_step_coefficients


def flow_sigmas(scheduler, num_steps: int, *, image_seq_len: int, sigmas: Optional[Sequence[float]] = None) -> torch.Tensor:
    """[T+1] fp32 noise levels σ_0 = (near) 1 > ... > σ_T = 0, as the family's pipeline sets them: the scheduler's
    own spacing (SD3) or given ``sigmas`` (FLUX: linspace(1, 1/T, T)), then its shift: the fixed ``shift``, or the
    resolution-dependent one (``use_dynamic_shifting``: μ interpolated in ``image_seq_len`` between the scheduler's
    base and max sequence lengths and shifts, diffusers' ``calculate_shift``)."""
    config = scheduler.config
    kwargs = {}
    if config.get("use_dynamic_shifting", False):
        base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
        base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
        slope = (max_shift - base_shift) / (max_len - base_len)
        kwargs["mu"] = image_seq_len * slope + base_shift - slope * base_len
    if sigmas is not None:
        scheduler.set_timesteps(sigmas=list(sigmas), **kwargs)
    else:
        scheduler.set_timesteps(num_steps, **kwargs)
    return scheduler.sigmas.to(torch.float32).cpu()


class FlowSampler:
    """T steps between the noise levels ``sigmas`` [T+1] with noise level a (0: the deterministic Euler step)."""

    def __init__(self, sigmas: torch.Tensor, noise_level: float, *, sde_type: str = "sde", reduce: str = "mean",
                 backend: str = "auto", device: torch.device = torch.device("cpu")):
        self.sigmas = sigmas.to(device=device, dtype=torch.float32)  # [T+1]
        self.noise_level, self.sde_type, self.reduce, self.backend = noise_level, sde_type, reduce, backend
        sigma_max = float(sigmas[1]) if len(sigmas) > 2 else None  # flow_grpo's stand-in at σ = 1: sigmas[1]
        self.coefficients = flow_step_coefficients(self.sigmas[:-1], self.sigmas[1:], noise_level, sde_type,
                                                   sigma_max)  # [T] each, on the device
        self.timesteps = self.sigmas[:-1] * 1000  # [T]: SD3's transformer is conditioned on σ·1000 (FLUX's on σ)

    @property
    def num_steps(self) -> int:
        return self.sigmas.shape[0] - 1

    def step(self, output: torch.Tensor, x: torch.Tensor, steps: torch.Tensor, *, x_prev: Optional[torch.Tensor] = None,
             noise: Optional[torch.Tensor] = None) -> FlowStepOutput:
        """x_σ -> x_σ′ at ``steps`` [B]: sampled with ``noise``, or ``x_prev`` scored (see flow_step_reference)."""
        return kernels.flow_step(output, x, self.coefficients.at(steps), x_prev=x_prev, noise=noise,
                                 reduce=self.reduce, backend=self.backend)

    def xhat0(self, output: torch.Tensor, x: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """x̂_0 = x − σ v̂, fp32."""
        sigma = self.sigmas[steps].reshape(-1, *([1] * (x.dim() - 1)))
        return x.float() - sigma * output.float()

    def score_scale(self) -> torch.Tensor:
        """[T] |c_v| / std: mean = c_x x + c_v v̂; NaN where std = 0 (a deterministic step)."""
        c = self.coefficients
        return torch.where(c.std > 0, c.c_v.abs() / c.std, torch.full_like(c.std, float("nan")))
