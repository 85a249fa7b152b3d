"""Per-step loss weights of ``dag.step_weighting``, from a sampler's score scale (family-blind)."""
from __future__ import annotations

from typing import Optional

import torch


def step_weights(score_scale: torch.Tensor, weighting: str) -> Optional[torch.Tensor]:
    """[T] per-step loss weights (None: uniform). score_scale: 1 / (the step's log-prob score scale), mean 1 over the
    steps; deterministic steps (NaN score scale: σ = 0) keep weight 1."""
    if weighting == "uniform":
        return None
    inverse = 1 / score_scale
    stochastic = torch.isfinite(inverse)
    if not stochastic.any():
        return None
    return torch.where(stochastic, inverse / inverse[stochastic].mean(), torch.ones_like(inverse))
