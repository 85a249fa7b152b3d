"""Objectives as objects: DAG-DB, DAG-KL and the DDPO and GRPO baselines. Each returns ``(loss, metrics)``.

The trainer evaluates the current model on a minibatch of transitions x_t -> x_{t-1} (one per sample; samples
may sit at different steps) and hands the results over as :class:`TransitionTerms`; objectives never touch
models, samplers, optimizers or loggers, and never ask which model family produced the terms. Metrics are detached
0-d tensors so the hot loop never syncs with the host. The residual, the DB loss and the RLOO advantages go through
``fastdag.kernels`` (Triton or reference, by ``backend``). DAG's flow network F_φ is ``flow_network``; the baselines'
per-trajectory advantages are ``advantages``.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from fastdag.config import DagConfig
from fastdag.objectives.base import (
    Metrics, TransitionTerms, beta_at, db_loss, ppo_clipped_loss, proximal_penalty,
)
from fastdag.objectives.dag_db import DagDB
from fastdag.objectives.dag_kl import DagKL
from fastdag.objectives.policy_gradient import DDPO, GRPO

__all__ = ["DDPO", "GRPO", "DagDB", "DagKL", "Metrics", "TransitionTerms", "beta_at", "build_objective", "db_loss",
           "ppo_clipped_loss", "proximal_penalty"]


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
