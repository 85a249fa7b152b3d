"""Objectives as objects: DAG-DB, DAG-KL and the DDPO baseline. Each returns ``(loss, metrics)``.

The trainer evaluates the current model on a minibatch of transitions x_t -> x_{t-1} (one per sample; samples
may sit at different steps) and hands the results over as :class:`TransitionTerms`; objectives never touch
models, optimizers or loggers. Metrics are detached 0-d tensors so the hot loop never syncs with the host.
The residual, the DB loss and the RLOO advantages go through ``kernels`` (Triton or reference, by ``backend``).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import torch

from fastdag import kernels
from fastdag.config import DagConfig

Metrics = dict[str, torch.Tensor]


@dataclass
class TransitionTerms:
    """Per-transition quantities for a minibatch of B transitions (all [B] unless stated)."""

    log_pf: torch.Tensor  # log p_θ(x_{t-1} | x_t) under the current policy (carries θ)
    log_pb: torch.Tensor  # log q(x_t | x_{t-1}), fixed
    log_pf_old: torch.Tensor  # log p at sampling time
    eps: torch.Tensor  # [B, C, H, W] current CFG noise prediction (carries θ)
    eps_old: torch.Tensor  # [B, C, H, W] CFG noise prediction at sampling time
    log_flow_t: Optional[torch.Tensor] = None  # log F(x_t) = F_φ(x_t) + β r̂(x_t) (carries φ)
    log_flow_prev: Optional[torch.Tensor] = None  # log F(x_{t-1}); β r(x_0) at the last step
    advantages: Optional[torch.Tensor] = None  # DDPO: per-trajectory advantages
    groups: int = 1  # the B transitions are `groups` equal blocks, one per timestep (DAG-KL's RLOO runs per block)
    weights: Optional[torch.Tensor] = None  # [B] per-transition loss weights (dag.step_weighting); None: uniform
    eps_ref: Optional[torch.Tensor] = None  # [B, C, H, W] GRPO's KL: the base model's (LoRA off) CFG output
    kl_scale: Optional[torch.Tensor] = None  # [B] (∂μ/∂o / σ_t)² / 2: KL per unit squared output difference


def beta_at(epoch: int, cfg: DagConfig, epochs: int) -> float:
    """β for a 0-based epoch: linear from 0 to ``cfg.beta`` over the first ``anneal_fraction`` of epochs."""
    if cfg.beta_schedule == "constant":
        return cfg.beta
    return cfg.beta * min(1.0, epoch / (cfg.anneal_fraction * epochs))


def proximal_penalty(terms: TransitionTerms) -> torch.Tensor:
    """mean((ε̂_θ − ε̂_rollout)²): an l2 stand-in for KL(p_θ ‖ p_θold) per step."""
    return ((terms.eps.float() - terms.eps_old.float()) ** 2).mean()


def db_loss(terms: TransitionTerms, log_pf: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(δ [B], mean(w δ²)) with ``log_pf`` in δ (DAG-KL passes it detached). Unweighted through the fused kernel;
    weighted (``terms.weights``) in PyTorch: any positive weights leave DB's minimiser (δ = 0 everywhere) in place."""
    if terms.weights is None:
        return kernels.db_loss(terms.log_flow_t, terms.log_flow_prev, log_pf, terms.log_pb, backend=backend)
    delta = kernels.db_residual(terms.log_flow_t, terms.log_flow_prev, log_pf, terms.log_pb, backend=backend)
    return delta, (terms.weights * delta.float() ** 2).mean()


def ppo_clipped_loss(log_p: torch.Tensor, log_p_old: torch.Tensor, adv: torch.Tensor, eps: float,
                     weights: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Metrics]:
    """mean(w · max(−A ρ, −A clip(ρ, 1−ε, 1+ε))) with ρ = exp(log p − log p_old); w = 1 by default."""
    ratio = torch.exp(log_p - log_p_old)
    per_transition = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - eps, 1 + eps))
    loss = (per_transition if weights is None else weights * per_transition).mean()
    clipfrac = ((ratio - 1).abs() > eps).float().mean()
    return loss, {"clipfrac": clipfrac.detach(), "ratio": ratio.detach().mean()}


class DagDB:
    """DAG-DB (Eq. 8): L = mean(δ²) + λ·prox; gradients reach θ through log p_θ and φ through the flows."""

    uses_flow = True

    def __init__(self, prox_coef: float, backend: str = "reference"):
        self.prox_coef, self.backend = prox_coef, backend

    def residuals(self, terms: TransitionTerms) -> torch.Tensor:
        """δ [B] = log F(x_t) + log p_F − log p_B − log F(x_{t−1})."""
        return kernels.db_residual(terms.log_flow_t, terms.log_flow_prev, terms.log_pf, terms.log_pb, backend=self.backend)

    def __call__(self, terms: TransitionTerms) -> tuple[torch.Tensor, Metrics]:
        delta, db = db_loss(terms, terms.log_pf, self.backend)
        prox = proximal_penalty(terms)
        loss = db + self.prox_coef * prox
        return loss, {"loss": loss.detach(), "db_loss": db.detach(), "prox": prox.detach(), "residual_abs": delta.detach().abs().mean()}


class DagKL:
    """DAG-KL (Eq. 14): the flow learns by DB with log p_θ detached; the policy by a clipped KL-gradient term.

    a_i = sg(−δ_i) with RLOO advantages; L = L_DB(φ) + c_KL · L_KL + λ · prox.

    ``gather`` (data-parallel, ``dag.rloo_scope: global``) maps this process's returns [b] to (the whole
    minibatch's returns [B] over all processes, the slice holding this process's); the leave-one-out baseline is
    then taken over all B, as a single process would.
    """

    uses_flow = True

    def __init__(self, kl_coef: float, ratio_clip: float, adv_clip: float, prox_coef: float, backend: str = "reference",
                 gather: Optional[Callable[[torch.Tensor], tuple[torch.Tensor, slice]]] = None,
                 rloo_normaliser: str = "official"):
        self.kl_coef, self.ratio_clip, self.adv_clip, self.prox_coef = kl_coef, ratio_clip, adv_clip, prox_coef
        self.backend, self.gather, self.rloo_normaliser = backend, gather, rloo_normaliser

    def advantages(self, returns: torch.Tensor) -> torch.Tensor:
        rloo = partial(kernels.rloo_advantages, adv_clip=self.adv_clip, normaliser=self.rloo_normaliser,
                       backend=self.backend)
        if self.gather is None:
            return rloo(returns)
        everyone, mine = self.gather(returns)
        return rloo(everyone)[mine]

    def residuals(self, terms: TransitionTerms) -> torch.Tensor:
        """δ [B] with log p_F detached: the flow network's DB residual."""
        return kernels.db_residual(terms.log_flow_t, terms.log_flow_prev, terms.log_pf.detach(), terms.log_pb,
                                   backend=self.backend)

    def __call__(self, terms: TransitionTerms) -> tuple[torch.Tensor, Metrics]:
        delta, db = db_loss(terms, terms.log_pf.detach(), self.backend)
        # One leave-one-out baseline per timestep block: the same advantages as one timestep per micro-step.
        adv = torch.cat([self.advantages(block) for block in (-delta.detach()).chunk(terms.groups)])
        kl, kl_metrics = ppo_clipped_loss(terms.log_pf, terms.log_pf_old, adv, self.ratio_clip, terms.weights)
        prox = proximal_penalty(terms)
        loss = db + self.kl_coef * kl + self.prox_coef * prox
        return loss, {
            "loss": loss.detach(), "db_loss": db.detach(), "kl_loss": kl.detach(), "prox": prox.detach(),
            "residual_abs": delta.detach().abs().mean(), **kl_metrics,
        }


class DDPO:
    """The DDPO baseline (Black et al.): PPO-clipped policy gradient on per-trajectory reward advantages."""

    uses_flow = False

    def __init__(self, ratio_clip: float, adv_clip: float):
        self.ratio_clip, self.adv_clip = ratio_clip, adv_clip

    def __call__(self, terms: TransitionTerms) -> tuple[torch.Tensor, Metrics]:
        adv = terms.advantages.clamp(-self.adv_clip, self.adv_clip)
        loss, metrics = ppo_clipped_loss(terms.log_pf, terms.log_pf_old, adv, self.ratio_clip, terms.weights)
        return loss, {"loss": loss.detach(), "ppo_loss": loss.detach(), **metrics}


class GRPO(DDPO):
    """GRPO as flow_grpo / DanceGRPO run it on a stochastic sampler: DDPO's PPO-clipped loss on group advantages
    (:func:`fastdag.advantages.group_advantages`) plus ``kl_coef`` × KL(p_θ ‖ p_ref) per transition, p_ref the base
    model: both Gaussians share σ_t, so KL = mean((μ_θ − μ_ref)²) / (2σ_t²), and μ is linear in the model output o
    (x̂_0's clip aside), so μ_θ − μ_ref = (∂μ/∂o)(o_θ − o_ref) and KL = kl_scale · mean((o_θ − o_ref)²)."""

    def __init__(self, ratio_clip: float, adv_clip: float, kl_coef: float = 0.0):
        super().__init__(ratio_clip, adv_clip)
        self.kl_coef = kl_coef

    def __call__(self, terms: TransitionTerms) -> tuple[torch.Tensor, Metrics]:
        loss, metrics = super().__call__(terms)
        if self.kl_coef == 0:
            return loss, metrics
        sq = ((terms.eps.float() - terms.eps_ref.float()) ** 2).flatten(1).mean(dim=1)
        kl = (terms.kl_scale * sq).mean()
        loss = loss + self.kl_coef * kl
        return loss, {**metrics, "loss": loss.detach(), "kl_ref": kl.detach()}


def build_objective(cfg: DagConfig, backend: str = "reference",
                    gather: Optional[Callable[[torch.Tensor], tuple[torch.Tensor, slice]]] = None):
    """The objective of ``dag.algorithm``; ``backend`` is ``kernels.backend`` (auto | triton | reference);
    ``gather`` is DAG-KL's cross-process gather of returns, used when ``dag.rloo_scope`` is global."""
    if cfg.algorithm == "db":
        return DagDB(cfg.prox_coef, backend)
    if cfg.algorithm == "kl":
        return DagKL(cfg.kl_coefficient, cfg.ratio_clip, cfg.adv_clip, cfg.prox_coef, backend,
                     gather if cfg.rloo_scope == "global" else None, cfg.rloo_normaliser)
    if cfg.algorithm == "grpo":
        return GRPO(cfg.ratio_clip, cfg.adv_clip, cfg.grpo_kl_coef)
    return DDPO(cfg.ratio_clip, cfg.adv_clip)
