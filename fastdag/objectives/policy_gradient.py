"""The baselines users compare DAG with: DDPO (Black et al., ddpo-pytorch) and GRPO (flow_grpo / DanceGRPO)."""
from __future__ import annotations

from fastdag.objectives.base import Metrics, TransitionTerms, ppo_clipped_loss


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
