"""Rollouts: sample trajectories with the family's sampler and guidance, recording everything the objectives need.

Family-blind: the model family predicts (``predict``), the sampler steps (``step``, with log p_F and log p_B) and
turns outputs into x̂_0 (``xhat0``). Per trajectory the policy runs T guided denoiser forwards. With
``xhat_rewards: rollout`` the x̂_0 of every state is taken from the *conditional* half of the CFG batch at sampling
time (free) and each state is decoded and scored once; with ``recompute`` the trainer rescoring happens per
transition instead (the official code's cost).

A rollout batch is denoised (:func:`rollout_batch`), then decoded and scored (:func:`score_rollout`); the trainer
can run the scoring of batch k on a side thread and CUDA stream while batch k+1 denoises
(:class:`OverlappedScorer`), score only the states it will train on, and decode intermediate states with a cheap
decoder. The static-shape step can replay as a CUDA graph (:class:`GraphedStep`).
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterator, Optional

import torch

from fastdag.families import Cond, ModelFamily, log_once
from fastdag.profiling import NULL_TIMER, PhaseTimer
from fastdag.rewards import CheckedReward

log = logging.getLogger(__name__)


@dataclass
class Trajectories:
    """B trajectories of T sampler steps; step i goes from ``latents[:, i]`` to ``latents[:, i + 1]``.

    The x̂_0 reward of state i is r(decode(x̂_0(latents[:, i]))) with x̂_0 from the conditional model output;
    the state after the last step (x_0) is scored with the true ``rewards``.
    """

    prompts: list[str]  # B
    prompt_embeds: Optional[Cond]  # B rows; None for unconditional models
    latents: torch.Tensor  # [B, T+1, C, H, W]: x_T ... x_0
    log_pf: torch.Tensor  # [B, T] fp32, log p_θ(x_{t-1} | x_t) at sampling time
    log_pb: torch.Tensor  # [B, T] fp32, log q(x_t | x_{t-1})
    eps: torch.Tensor  # [B, T, C, H, W] guided model output at sampling time (ε̂ or v̂; proximal regulariser)
    timesteps: torch.Tensor  # [B, T] the model timesteps (long for DDIM, σ·1000 for flow)
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
            elif isinstance(values[0], Cond):
                out[f.name] = Cond.cat(values)
            else:
                out[f.name] = torch.cat(values)
        return Trajectories(**out)


def score_latents(
    model: ModelFamily, reward: CheckedReward, latents: torch.Tensor, prompts: list[str], batch_size: int,
    keep_images: bool = False, *, cheap: bool = False, timer: PhaseTimer = NULL_TIMER,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Decode [N, C, H, W] latents in batches and score them: (rewards [N], images [N, 3, H', W'] or None), CPU.

    ``cheap`` decodes with the model's x̂_0 decoder (``dag.xhat_decoder``) when one is loaded.
    """
    rewards, images = [], []
    for i in range(0, latents.shape[0], batch_size):
        with timer.phase("decode"):
            img = model.decode(latents[i : i + batch_size], cheap=cheap)
        with timer.phase("reward"):
            rewards.append(reward(img, prompts[i : i + batch_size]))
        if keep_images:
            images.append(img.cpu())
    return torch.cat(rewards), (torch.cat(images) if keep_images else None)


def cuda_graphs_usable(model: ModelFamily, requested: bool) -> bool:
    """Whether rollout steps may be CUDA-graphed: asked for, a CUDA device, and CUDA available (graph objects
    cannot even be constructed without it). Asking for them elsewhere is logged once; the rollout runs eager."""
    if not requested:
        return False
    if model.device.type == "cuda" and torch.cuda.is_available():
        return True
    log_once(f"sample.cuda_graphs: CUDA graphs need a CUDA device (model on {model.device}); running eager")
    return False


class GraphedStep:
    """One rollout step (guided denoiser forward + sampler step) captured in a CUDA graph for a fixed batch size.

    Inputs are copied into static buffers (x [B, C, H, W], step indices [B], noise [B, C, H, W], cond) and the
    graph replayed; the outputs (guided output, conditional output, step output) are static buffers overwritten by
    the next replay, so callers copy what they keep. The sampler's schedule is a static device tensor indexed inside
    the graph. The LoRA weights are read through their storage, so in-place optimizer updates are seen by later
    replays.
    """

    def __init__(self, model: ModelFamily, sampler, uncond: Optional[Cond], batch: int, *, guidance_scale: float,
                 cond: Optional[Cond]):
        dev = model.device
        self.x = torch.zeros((batch, *model.latent_shape), device=dev)  # [B, C, H, W]
        self.noise = torch.zeros_like(self.x)
        self.steps = torch.zeros((batch,), dtype=torch.long, device=dev)
        self.cond = cond.clone() if cond is not None else None

        def body():
            out, out_cond = model.predict(self.x, sampler.timesteps[self.steps], self.cond, uncond, guidance_scale)
            return out, out_cond, sampler.step(out, self.x, self.steps, noise=self.noise)

        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up off the capture: allocator, cuDNN/Triton autotuning
            for _ in range(3):
                body()
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.eps, self.eps_cond, self.out = body()

    def __call__(self, x, steps, noise, cond):
        self.x.copy_(x)
        self.steps.copy_(steps)
        self.noise.copy_(noise)
        if self.cond is not None:
            self.cond.copy_(cond)
        self.graph.replay()
        return self.eps, self.eps_cond, self.out


def graphed_step(model: ModelFamily, sampler, uncond: Optional[Cond], batch: int, cond: Optional[Cond], *,
                 guidance_scale: float) -> GraphedStep:
    """The model's cached :class:`GraphedStep` for this sampler, batch size and guidance (captured on first use)."""
    key = (id(sampler), batch, guidance_scale, None if cond is None else tuple(cond.embeds.shape))
    if key not in model.cuda_graphs:
        model.cuda_graphs[key] = GraphedStep(model, sampler, uncond, batch, guidance_scale=guidance_scale, cond=cond)
    return model.cuda_graphs[key]


def gaussian_rows(shape: tuple[int, ...], generator: torch.Generator, device: torch.device,
                  share: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """N(0, I) noise [B, ...]. With ``share = (rank, world)`` it is rows ``rank::world`` of one draw for the whole
    data-parallel batch [world * B, ...] (see ``fastdag.distributed``): a trajectory's noise then depends on its
    global index, not on how many processes share the batch."""
    if share is None:
        return torch.randn(shape, generator=generator, device=device)
    rank, world = share
    return torch.randn((world * shape[0], *shape[1:]), generator=generator, device=device)[rank::world].contiguous()


def denoise(
    model: ModelFamily,
    sampler,
    x: torch.Tensor,
    cond: Optional[Cond],
    uncond: Optional[Cond],
    *,
    guidance_scale: float,
    generator: torch.Generator,
    graph: Optional[GraphedStep] = None,
    timer: PhaseTimer = NULL_TIMER,
    share: Optional[tuple[int, int]] = None,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Any]]:
    """Run the sampler's T steps from x = x_T; yields (i, steps [B], x_t, guided output, conditional output, step
    output) per step.

    With ``graph`` the step replays a CUDA graph; the yielded tensors are then its static buffers, valid until
    the next step.
    """
    b = x.shape[0]
    for i in range(sampler.num_steps):
        steps = torch.full((b,), i, dtype=torch.long, device=x.device)
        noise = gaussian_rows(x.shape, generator, x.device, share)
        if graph is not None:
            with timer.phase("unet"):  # denoiser and step math replay as one graph
                eps, eps_cond, out = graph(x, steps, noise, cond)
            x = graph.x
        else:
            with timer.phase("unet"):
                eps, eps_cond = model.predict(x, sampler.timesteps[steps], cond, uncond, guidance_scale)
            with timer.phase("step"):
                out = sampler.step(eps, x, steps, noise=noise)
        yield i, steps, x, eps, eps_cond, out
        x = out.x_prev


@dataclass
class Rollout:
    """One rollout batch before its rewards are scored (shapes as :class:`Trajectories`)."""

    prompts: list[str]  # B
    prompt_embeds: Optional[Cond]  # B rows
    latents: torch.Tensor  # [B, T+1, C, H, W]
    log_pf: torch.Tensor  # [B, T]
    log_pb: torch.Tensor  # [B, T]
    eps: torch.Tensor  # [B, T, C, H, W]
    timesteps: torch.Tensor  # [B, T]
    xhat: Optional[torch.Tensor]  # [B, T, C, H, W] fp32 x̂_0 of states 0..T-1 (conditional output), or None


@torch.no_grad()
def rollout_batch(
    model: ModelFamily,
    sampler,
    prompts: list[str],
    *,
    guidance_scale: float,
    uncond: Optional[Cond],
    generator: torch.Generator,
    keep_xhat: bool,
    cuda_graphs: bool = False,
    timer: PhaseTimer = NULL_TIMER,
    share: Optional[tuple[int, int]] = None,
) -> Rollout:
    """Denoise B = len(prompts) trajectories from x_T ~ N(0, I); no decoding or scoring (see :func:`score_rollout`).

    ``share = (rank, world)``: this process's rows of a data-parallel batch (see :func:`gaussian_rows`)."""
    b, T, dev = len(prompts), sampler.num_steps, model.device
    cond = model.encode_prompts(prompts)
    x = gaussian_rows((b, *model.latent_shape), generator, dev, share)
    latents = torch.empty((b, T + 1, *model.latent_shape), device=dev)  # [B, T+1, C, H, W]
    eps_all = torch.empty((b, T, *model.latent_shape), device=dev)  # [B, T, C, H, W]
    xhat = torch.empty_like(eps_all) if keep_xhat else None  # [B, T, C, H, W]
    log_pf = torch.empty((b, T), device=dev)
    log_pb = torch.empty((b, T), device=dev)
    latents[:, 0] = x
    graph = None
    if cuda_graphs_usable(model, cuda_graphs):
        graph = graphed_step(model, sampler, uncond, b, cond, guidance_scale=guidance_scale)
    steps = denoise(model, sampler, x, cond, uncond, guidance_scale=guidance_scale, generator=generator, graph=graph,
                    timer=timer, share=share)
    for i, step_index, x_t, eps, eps_cond, out in steps:
        with timer.phase("step"):
            if keep_xhat:
                # The forward-looking flow uses x̂_0 of the conditional prediction (no CFG), as the official code.
                xhat[:, i] = sampler.xhat0(eps_cond, x_t, step_index)
            latents[:, i + 1] = out.x_prev
            eps_all[:, i] = eps
            log_pf[:, i], log_pb[:, i] = out.log_pf, out.log_pb
    return Rollout(list(prompts), cond, latents, log_pf, log_pb, eps_all, sampler.timesteps.expand(b, T).clone(), xhat)


@torch.no_grad()
def score_rollout(
    model: ModelFamily,
    reward: CheckedReward,
    rollout: Rollout,
    *,
    reward_batch_size: int,
    xhat_mask: Optional[torch.Tensor] = None,
    timer: PhaseTimer = NULL_TIMER,
) -> Trajectories:
    """Decode and score the final samples and (if kept) the x̂_0 of the states selected by ``xhat_mask``.

    ``xhat_mask`` [B, T] bool (CPU) selects the states to score (``dag.xhat_states: trained``); the others get
    NaN x̂_0 rewards and must not be trained on. None scores every state.
    """
    r, dev = rollout, model.device
    b, T = r.log_pf.shape
    rewards, images = score_latents(model, reward, r.latents[:, T], r.prompts, reward_batch_size, keep_images=True,
                                    timer=timer)
    xhat_rewards = None
    if r.xhat is not None:
        if xhat_mask is None:
            flat = r.xhat.reshape(b * T, *model.latent_shape)  # state-major: sample 0's T states, then sample 1's ...
            flat_prompts = [p for p in r.prompts for _ in range(T)]
            xhat_rewards = score_latents(model, reward, flat, flat_prompts, reward_batch_size, cheap=True,
                                         timer=timer)[0].reshape(b, T).to(dev)
        else:
            mask = xhat_mask.cpu()
            flat_prompts = [r.prompts[i] for i in mask.nonzero()[:, 0].tolist()]
            scored = torch.full((b, T), float("nan"))
            if flat_prompts:
                scored[mask] = score_latents(model, reward, r.xhat[mask.to(r.xhat.device)], flat_prompts,
                                             reward_batch_size, cheap=True, timer=timer)[0].float()
            xhat_rewards = scored.to(dev)
    return Trajectories(
        prompts=r.prompts, prompt_embeds=r.prompt_embeds, latents=r.latents, log_pf=r.log_pf, log_pb=r.log_pb,
        eps=r.eps, timesteps=r.timesteps, rewards=rewards.to(dev), xhat_rewards=xhat_rewards, images=images,
    )


class _Done:
    def __init__(self, value):
        self._value = value

    def result(self):
        return self._value


class OverlappedScorer:
    """Runs scoring jobs on one side thread and a side CUDA stream, so batch k's decoding and reward calls overlap
    batch k+1's denoising (``dag.xhat_overlap``). On a CPU, or when disabled, jobs run inline when submitted.

    One worker: reward calls never run concurrently with each other. ``submit(fn, tensors)`` makes the side
    stream wait for the work queued so far and marks ``tensors`` (the rollout's outputs) as used by it.
    """

    def __init__(self, device: torch.device, enabled: bool):
        self.device = device
        self.enabled = enabled and device.type == "cuda" and torch.cuda.is_available()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastdag-score") if self.enabled else None
        self._stream = torch.cuda.Stream(device) if self.enabled else None

    def submit(self, fn: Callable[[], Trajectories], tensors: tuple[torch.Tensor, ...] = ()):
        if not self.enabled:
            return _Done(fn())
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        for t in tensors:
            t.record_stream(self._stream)

        def job():
            with torch.no_grad(), torch.cuda.device(self.device), torch.cuda.stream(self._stream):
                self._stream.wait_event(ready)
                out = fn()
            self._stream.synchronize()  # results are complete before the main stream reads them
            return out

        return self._pool.submit(job)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


@torch.no_grad()
def generate_images(
    model: ModelFamily,
    sampler,
    prompts: list[str],
    *,
    guidance_scale: float,
    uncond: Optional[Cond],
    generator: torch.Generator,
) -> torch.Tensor:
    """Sample one image per prompt: float [B, 3, H, W] in [0, 1] on the CPU (for evaluation and reports)."""
    x = torch.randn((len(prompts), *model.latent_shape), generator=generator, device=model.device)
    cond = model.encode_prompts(prompts)
    for *_, out in denoise(model, sampler, x, cond, uncond, guidance_scale=guidance_scale, generator=generator):
        x = out.x_prev
    return model.decode(x).cpu()
