"""Rollouts: sample trajectories with CFG, recording everything the objectives need.

Per trajectory the policy runs T CFG UNet forwards. With ``xhat_rewards: rollout`` the x̂_0 of every state is
taken from the *conditional* half of the CFG batch at sampling time (free) and each state is decoded and scored
once; with ``recompute`` the trainer rescoring happens per transition instead (the official code's cost).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Iterator, Optional

import torch

from fastdag.models import DiffusionModel, StepSchedule
from fastdag.rewards import CheckedReward
from kernels.ddim_step import DDIMStepOutput


@dataclass
class Trajectories:
    """B trajectories of T DDIM steps; step i goes from ``latents[:, i]`` to ``latents[:, i + 1]``.

    The x̂_0 reward of state i is r(decode(x̂_0(latents[:, i]))) with x̂_0 from the conditional noise prediction;
    the state after the last step (x_0) is scored with the true ``rewards``.
    """

    prompts: list[str]  # B
    prompt_embeds: Optional[torch.Tensor]  # [B, L, D]; None for unconditional models
    latents: torch.Tensor  # [B, T+1, C, H, W]: x_T ... x_0
    log_pf: torch.Tensor  # [B, T] fp32, log p_θ(x_{t-1} | x_t) at sampling time
    log_pb: torch.Tensor  # [B, T] fp32, log q(x_t | x_{t-1})
    eps: torch.Tensor  # [B, T, C, H, W] CFG noise prediction at sampling time (proximal regulariser)
    timesteps: torch.Tensor  # [B, T] long
    rewards: torch.Tensor  # [B] fp32, r(decode(x_0))
    xhat_rewards: Optional[torch.Tensor]  # [B, T] fp32 x̂_0 rewards of states 0..T-1; None when recomputed
    images: torch.Tensor  # [B, 3, H, W] final images in [0, 1] (CPU)

    @property
    def num_steps(self) -> int:
        return self.log_pf.shape[1]

    def __len__(self) -> int:
        return self.latents.shape[0]

    @staticmethod
    def cat(parts: list["Trajectories"]) -> "Trajectories":
        out = {}
        for f in fields(Trajectories):
            values = [getattr(p, f.name) for p in parts]
            if values[0] is None:
                out[f.name] = None
            elif isinstance(values[0], list):
                out[f.name] = [x for v in values for x in v]
            else:
                out[f.name] = torch.cat(values)
        return Trajectories(**out)


def xhat0(x_t: torch.Tensor, eps: torch.Tensor, alpha_t: torch.Tensor) -> torch.Tensor:
    """x̂_0 = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t with ᾱ_t [B]; fp32."""
    a = alpha_t.float().reshape(-1, *([1] * (x_t.dim() - 1)))
    return (x_t.float() - torch.sqrt(1 - a) * eps.float()) / torch.sqrt(a)


def score_latents(
    model: DiffusionModel, reward: CheckedReward, latents: torch.Tensor, prompts: list[str], batch_size: int,
    keep_images: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Decode [N, C, H, W] latents in batches and score them: (rewards [N], images [N, 3, H', W'] or None), CPU."""
    rewards, images = [], []
    for i in range(0, latents.shape[0], batch_size):
        img = model.decode(latents[i : i + batch_size])
        rewards.append(reward(img, prompts[i : i + batch_size]))
        if keep_images:
            images.append(img.cpu())
    return torch.cat(rewards), (torch.cat(images) if keep_images else None)


def denoise(
    model: DiffusionModel,
    schedule: StepSchedule,
    x: torch.Tensor,
    cond: Optional[torch.Tensor],
    uncond: Optional[torch.Tensor],
    *,
    guidance_scale: float,
    eta: float,
    reduce: str,
    step_fn: Callable,
    generator: torch.Generator,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, DDIMStepOutput]]:
    """Run the T DDIM steps from x = x_T; yields (i, x_t, ε̂ CFG, ε_c conditional, step output) per step."""
    b = x.shape[0]
    for i in range(schedule.num_steps):
        t = schedule.timesteps[i].expand(b)
        a_t, a_prev = schedule.alpha_t[i].expand(b), schedule.alpha_prev[i].expand(b)
        eps, eps_cond = model.predict_eps(x, t, cond, uncond, guidance_scale)
        noise = torch.randn(x.shape, generator=generator, device=x.device)
        out = step_fn(eps, x, a_t, a_prev, eta, noise=noise, reduce=reduce)
        yield i, x, eps, eps_cond, out
        x = out.x_prev


@torch.no_grad()
def sample_trajectories(
    model: DiffusionModel,
    schedule: StepSchedule,
    prompts: list[str],
    reward: CheckedReward,
    *,
    guidance_scale: float,
    eta: float,
    reduce: str,
    uncond: Optional[torch.Tensor],
    step_fn: Callable,
    generator: torch.Generator,
    score_xhat: bool,
    reward_batch_size: int,
) -> Trajectories:
    """Sample B = len(prompts) trajectories from x_T ~ N(0, I) with the current policy.

    ``step_fn`` has the signature of ``kernels.ddim_step_reference``; ``uncond`` is the [1, L, D] embedding of
    the negative prompt. ``score_xhat`` decodes and scores x̂_0 of every state once (``xhat_rewards: rollout``).
    """
    b, T, dev = len(prompts), schedule.num_steps, model.device
    cond = model.encode_prompts(prompts)
    x = torch.randn((b, *model.latent_shape), generator=generator, device=dev)
    latents = torch.empty((b, T + 1, *model.latent_shape), device=dev)  # [B, T+1, C, H, W]
    eps_all = torch.empty((b, T, *model.latent_shape), device=dev)  # [B, T, C, H, W]
    xhat = torch.empty_like(eps_all) if score_xhat else None  # [B, T, C, H, W]
    log_pf = torch.empty((b, T), device=dev)
    log_pb = torch.empty((b, T), device=dev)
    latents[:, 0] = x
    steps = denoise(model, schedule, x, cond, uncond, guidance_scale=guidance_scale, eta=eta, reduce=reduce,
                    step_fn=step_fn, generator=generator)
    for i, x_t, eps, eps_cond, out in steps:
        if score_xhat:
            # The forward-looking flow uses x̂_0 of the conditional prediction (no CFG), as the official code.
            xhat[:, i] = xhat0(x_t, eps_cond, schedule.alpha_t[i].expand(b))
        latents[:, i + 1] = out.x_prev
        eps_all[:, i] = eps
        log_pf[:, i], log_pb[:, i] = out.log_pf, out.log_pb

    rewards, images = score_latents(model, reward, latents[:, T], prompts, reward_batch_size, keep_images=True)
    xhat_rewards = None
    if score_xhat:
        flat = xhat.reshape(b * T, *model.latent_shape)  # state-major: sample 0's T states, then sample 1's ...
        flat_prompts = [p for p in prompts for _ in range(T)]
        xhat_rewards = score_latents(model, reward, flat, flat_prompts, reward_batch_size)[0].reshape(b, T).to(dev)
    return Trajectories(
        prompts=list(prompts),
        prompt_embeds=cond,
        latents=latents,
        log_pf=log_pf,
        log_pb=log_pb,
        eps=eps_all,
        timesteps=schedule.timesteps.expand(b, T).clone(),
        rewards=rewards.to(dev),
        xhat_rewards=xhat_rewards,
        images=images,
    )


@torch.no_grad()
def generate_images(
    model: DiffusionModel,
    schedule: StepSchedule,
    prompts: list[str],
    *,
    guidance_scale: float,
    eta: float,
    uncond: Optional[torch.Tensor],
    step_fn: Callable,
    generator: torch.Generator,
) -> torch.Tensor:
    """Sample one image per prompt: float [B, 3, H, W] in [0, 1] on the CPU (for evaluation and reports)."""
    x = torch.randn((len(prompts), *model.latent_shape), generator=generator, device=model.device)
    cond = model.encode_prompts(prompts)
    for _, _, _, _, out in denoise(model, schedule, x, cond, uncond, guidance_scale=guidance_scale, eta=eta,
                                   reduce="mean", step_fn=step_fn, generator=generator):
        x = out.x_prev
    return model.decode(x).cpu()
