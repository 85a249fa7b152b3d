"""What every objective shares: the per-transition terms the trainer hands over, β's schedule, the proximal
regulariser, the DB loss and the PPO-clipped surrogate. Family-blind: a transition is (x_t -> x_{t-1}) whatever the
sampler, and its log-densities come from the family's sampler."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

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
