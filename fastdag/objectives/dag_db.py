"""DAG-DB (detailed balance, Eq. 8 of the paper)."""
from __future__ import annotations

import torch

from fastdag import kernels
from fastdag.objectives.base import Metrics, TransitionTerms, db_loss, proximal_penalty


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
