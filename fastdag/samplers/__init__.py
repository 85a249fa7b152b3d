"""Samplers: a schedule of T steps bound to its stochasticity, the step kernels and the log-prob reduction.

Every family hands rollout and the objectives a :class:`Sampler`; they never ask which one it is. Step ``i`` of a
trajectory goes from state i to state i + 1 (noise to data); ``steps`` arguments are [B] long step indices, so
samples of one batch may sit at different steps (the update's shuffled transitions).

=====================  ==========================================================================================
``timesteps`` [T]      what the denoiser (and DAG's flow network) is conditioned on at each step: DDIM's integer
                       timestep, or σ·1000 for rectified flow (the scale SD3's transformer takes)
``step(o, x, steps)``  the next state (sampled, or scored when ``x_prev`` is given), log p_F, log p_B, x̂_0
``xhat0(o, x, steps)`` x̂_0 of a model output (DAG's forward-looking flow scores it)
``score_scale()`` [T]  |∂mean/∂o| / std per step: how strongly log p_F reacts to the model output o (step
                       weighting, GRPO's KL to the reference); NaN where the step is deterministic
=====================  ==========================================================================================
"""
from fastdag.samplers.ddim import DDIMSampler, StepSchedule, ddim_step_schedule, step_settings
from fastdag.samplers.flow import FlowSampler, flow_sigmas
from fastdag.samplers.weights import step_weights

__all__ = ["DDIMSampler", "FlowSampler", "StepSchedule", "ddim_step_schedule", "flow_sigmas", "step_settings",
           "step_weights"]
