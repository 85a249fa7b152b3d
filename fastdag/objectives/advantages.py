"""Per-trajectory advantages of the policy-gradient baselines, as their reference code computes them.

- DDPO (ddpo-pytorch, ``ddpo_pytorch/stat_tracking.py``): :class:`PerPromptStatTracker`, each prompt's rewards
  normalised by the mean and std of a buffer of its last ``buffer_size`` rewards, which persists across epochs; while
  the buffer holds fewer than ``min_count``, by the whole batch's. Or :func:`epoch_normalised` (the whole epoch).
- GRPO (flow_grpo / DanceGRPO): :func:`group_advantages`, each trajectory against the other trajectories of its
  prompt sampled in the same epoch, divided by the group's std (or the epoch's, or not at all).

All take the whole epoch's rewards [N] (over every process, global trajectory order) and the N prompts.
"""
from __future__ import annotations

from collections import deque
from typing import Sequence

import numpy as np
import torch


def epoch_normalised(rewards: torch.Tensor, population: torch.Tensor | None = None) -> torch.Tensor:
    """(r − mean) / (std + 1e-8) over ``population`` (default: ``rewards``), unbiased std; fastdag's first DDPO."""
    population = rewards if population is None else population
    return (rewards - population.mean()) / (population.std() + 1e-8)


class PerPromptStatTracker:
    """ddpo-pytorch's per-prompt normalisation (its defaults: buffer 16, min_count 16; std with ddof 0, + 1e-6)."""

    def __init__(self, buffer_size: int = 16, min_count: int = 16):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.stats: dict[str, deque] = {}

    def update(self, prompts: Sequence[str], rewards: torch.Tensor) -> torch.Tensor:
        """Add the epoch's rewards [N] to each prompt's buffer; return the advantages [N] fp32."""
        p = np.array(list(prompts))
        r = rewards.detach().double().cpu().numpy()
        advantages = np.empty_like(r)
        for prompt in np.unique(p):
            mine = r[p == prompt]
            buffer = self.stats.setdefault(str(prompt), deque(maxlen=self.buffer_size))
            buffer.extend(mine.tolist())
            if len(buffer) < self.min_count:
                mean, std = r.mean(), r.std() + 1e-6
            else:
                mean, std = np.mean(buffer), np.std(buffer) + 1e-6
            advantages[p == prompt] = (mine - mean) / std
        return torch.as_tensor(advantages, dtype=torch.float32)

    def state_dict(self) -> dict[str, list[float]]:
        return {k: list(v) for k, v in self.stats.items()}

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        self.stats = {k: deque(v, maxlen=self.buffer_size) for k, v in state.items()}


GROUP_STD = ("group", "global", "none")


def group_advantages(prompts: Sequence[str], rewards: torch.Tensor, std: str = "group") -> torch.Tensor:
    """GRPO: (r − mean of the prompt's group) / scale, scale = the group's std (``group``, DanceGRPO; flow_grpo's
    default), the epoch's (``global``, flow_grpo's ``global_std``) or 1 (``none``, no std: Dr. GRPO); std with ddof 0
    plus 1e-4, as flow_grpo. rewards [N] -> advantages [N] fp32."""
    if std not in GROUP_STD:
        raise ValueError(f"std must be one of {GROUP_STD}, got {std!r}")
    p = np.array(list(prompts))
    r = rewards.detach().double().cpu().numpy()
    advantages = np.empty_like(r)
    for prompt in np.unique(p):
        mine = r[p == prompt]
        scale = {"group": mine.std() + 1e-4, "global": r.std() + 1e-4, "none": 1.0}[std]
        advantages[p == prompt] = (mine - mine.mean()) / scale
    return torch.as_tensor(advantages, dtype=torch.float32)
