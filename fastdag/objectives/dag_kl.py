"""DAG-KL (Eq. 14 of the paper): the flow by DB with log p_θ detached, the policy by a clipped KL-gradient term."""
from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch

from fastdag import kernels
from fastdag.kernels.db_residual import RLOO_EPS
from fastdag.objectives.base import Metrics, TransitionTerms, db_loss, ppo_clipped_loss, proximal_penalty


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

    def block_advantages(self, returns: torch.Tensor, groups: int) -> torch.Tensor:
        """A [B] for ``groups`` equal timestep blocks of returns [B]: a leave-one-out baseline per block, and the
        scale per block (``official``, ``loo_std``) or one scale over all the blocks (``pooled``)."""
        blocks = returns.chunk(groups)
        if self.rloo_normaliser != "pooled":
            return torch.cat([self.advantages(block) for block in blocks])
        parts = []
        for block in blocks:
            everyone, mine = self.gather(block) if self.gather is not None else (block, slice(None))
            everyone = everyone.float()
            n = everyone.shape[0]
            parts.append((everyone - (everyone.sum() - everyone) / (n - 1), mine))  # a_i − b_i
        scale = torch.cat([dev for dev, _ in parts]).square().mean().sqrt()
        return torch.cat([(dev / (scale + RLOO_EPS)).clamp(-self.adv_clip, self.adv_clip)[mine] for dev, mine in parts])

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
        adv = self.block_advantages(-delta.detach(), terms.groups)
        kl, kl_metrics = ppo_clipped_loss(terms.log_pf, terms.log_pf_old, adv, self.ratio_clip, terms.weights)
        prox = proximal_penalty(terms)
        loss = db + self.kl_coef * kl + self.prox_coef * prox
        return loss, {
            "loss": loss.detach(), "db_loss": db.detach(), "kl_loss": kl.detach(), "prox": prox.detach(),
            "residual_abs": delta.detach().abs().mean(), **kl_metrics,
        }
