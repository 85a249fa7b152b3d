"""Objectives against naive re-implementations of the paper's equations."""
import pytest
import torch

from fastdag.config import DagConfig
from fastdag.objectives import DDPO, DagDB, DagKL, TransitionTerms, beta_at, build_objective


def make_terms(b=6, grad=True):
    def r(*shape):
        return torch.randn(*shape, requires_grad=grad)

    return TransitionTerms(
        log_pf=r(b), log_pb=torch.randn(b), log_pf_old=torch.randn(b), eps=r(b, 4, 3, 3), eps_old=torch.randn(b, 4, 3, 3),
        log_flow_t=r(b), log_flow_prev=r(b), advantages=torch.randn(b),
    )


def test_db_loss_and_gradients():
    terms = make_terms()
    loss, metrics = DagDB(prox_coef=0.5)(terms)
    delta = terms.log_flow_t + terms.log_pf - terms.log_pb - terms.log_flow_prev
    expected = (delta**2).mean() + 0.5 * ((terms.eps - terms.eps_old) ** 2).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert terms.log_pf.grad is not None and terms.log_flow_t.grad is not None
    assert set(metrics) >= {"loss", "db_loss", "prox"} and all(v.dim() == 0 for v in metrics.values())


@pytest.mark.parametrize("normaliser", ["official", "loo_std"])
def test_kl_flow_term_does_not_reach_the_policy(normaliser):
    terms = make_terms()
    obj = DagKL(kl_coef=3.0, ratio_clip=1e-4, adv_clip=5.0, prox_coef=0.0, rloo_normaliser=normaliser)
    loss, metrics = obj(terms)
    delta = (terms.log_flow_t + terms.log_pf - terms.log_pb - terms.log_flow_prev).detach()
    a, n = -delta, len(delta)
    baseline = torch.stack([torch.cat([a[:i], a[i + 1 :]]).mean() for i in range(n)])  # leave-one-out means
    adv = []
    for i in range(n):
        if normaliser == "official":  # train_gfn.py: the mean of the others' squared deviations from their baselines
            scale = torch.cat([(a - baseline)[:i], (a - baseline)[i + 1 :]]).pow(2).mean().sqrt()
        else:  # the unbiased std of the others
            scale = torch.cat([a[:i], a[i + 1 :]]).std()
        adv.append(((a[i] - baseline[i]) / (scale + 1e-8)).clamp(-5, 5))
    adv = torch.stack(adv)
    ratio = torch.exp(terms.log_pf - terms.log_pf_old)
    kl = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - 1e-4, 1 + 1e-4)).mean()
    flow_delta = terms.log_flow_t + terms.log_pf.detach() - terms.log_pb - terms.log_flow_prev
    torch.testing.assert_close(loss, (flow_delta**2).mean() + 3.0 * kl)
    # the policy gradient comes only from the KL term: compare with its own gradient
    (g_total,) = torch.autograd.grad(loss, terms.log_pf, retain_graph=True)
    (g_kl,) = torch.autograd.grad(3.0 * kl, terms.log_pf)
    torch.testing.assert_close(g_total, g_kl)


def test_kl_coefficient_defaults_to_final_beta():
    obj = build_objective(DagConfig(algorithm="kl", beta=42.0))
    assert isinstance(obj, DagKL) and obj.kl_coef == 42.0
    assert build_objective(DagConfig(algorithm="kl", beta=42.0, kl_coef=1.0)).kl_coef == 1.0


def test_ddpo_is_ppo_on_advantages():
    terms = make_terms()
    loss, _ = DDPO(ratio_clip=0.2, adv_clip=5.0)(terms)
    ratio = torch.exp(terms.log_pf - terms.log_pf_old)
    adv = terms.advantages
    torch.testing.assert_close(loss, torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)).mean())
    from fastdag.objectives.advantages import epoch_normalised

    torch.testing.assert_close(epoch_normalised(torch.tensor([1.0, 2.0, 3.0])), torch.tensor([-1.0, 0.0, 1.0]))


@pytest.mark.parametrize("epoch, expected", [(0, 0.0), (2, 40.0), (5, 100.0), (9, 100.0)])
def test_linear_beta_anneals_over_first_half(epoch, expected):
    assert beta_at(epoch, DagConfig(beta=100.0), epochs=10) == pytest.approx(expected)
    assert beta_at(epoch, DagConfig(beta=100.0, beta_schedule="constant"), epochs=10) == 100.0


def test_weighted_objectives_are_the_weighted_means():
    """terms.weights scales each transition's DB residual² and policy term; uniform weights change nothing."""
    from fastdag.objectives import ppo_clipped_loss

    terms = make_terms()
    delta = (terms.log_flow_t + terms.log_pf - terms.log_pb - terms.log_flow_prev).detach()
    plain, _ = DagDB(prox_coef=0.0)(terms)
    terms.weights = torch.ones(6)
    torch.testing.assert_close(DagDB(prox_coef=0.0)(terms)[0], plain)
    w = torch.tensor([0.1, 2.0, 1.0, 0.5, 3.0, 0.4])
    terms.weights = w
    loss, metrics = DagDB(prox_coef=0.0)(terms)
    torch.testing.assert_close(loss, (w * delta**2).mean())
    assert metrics["residual_abs"] == pytest.approx(delta.abs().mean().item())  # the diagnostic stays unweighted
    adv = torch.randn(6)
    per = torch.maximum(-adv * torch.exp(terms.log_pf - terms.log_pf_old),
                        -adv * torch.exp(terms.log_pf - terms.log_pf_old).clamp(1 - 0.2, 1 + 0.2))
    torch.testing.assert_close(ppo_clipped_loss(terms.log_pf, terms.log_pf_old, adv, 0.2, w)[0], (w * per).mean())
    terms.weights = w
    kl_loss, _ = DagKL(kl_coef=1.0, ratio_clip=1e-4, adv_clip=5.0, prox_coef=0.0)(terms)
    terms.weights = None
    assert not torch.isclose(kl_loss, DagKL(kl_coef=1.0, ratio_clip=1e-4, adv_clip=5.0, prox_coef=0.0)(terms)[0])


def test_kl_pooled_normaliser_scales_all_timestep_blocks_alike():
    """dag.rloo_normaliser=pooled: each timestep block keeps its own leave-one-out baseline, one RMS scale over all
    blocks; a block whose residuals spread 10x more keeps 10x larger advantages (per block they would be alike)."""
    torch.manual_seed(3)
    b, groups = 6, 3
    terms = make_terms(b * groups)
    with torch.no_grad():  # make the first block's residuals spread 10x more
        terms.log_flow_t[:b] *= 10
    obj = DagKL(kl_coef=1.0, ratio_clip=1e-4, adv_clip=50.0, prox_coef=0.0, rloo_normaliser="pooled")
    terms.groups = groups
    delta = (terms.log_flow_t + terms.log_pf - terms.log_pb - terms.log_flow_prev).detach()
    devs = []
    for block in (-delta).chunk(groups):
        baseline = torch.stack([torch.cat([block[:i], block[i + 1 :]]).mean() for i in range(b)])
        devs.append(block - baseline)
    dev = torch.cat(devs)
    expected = dev / (dev.pow(2).mean().sqrt() + 1e-8)
    adv = obj.block_advantages(-delta, groups)
    torch.testing.assert_close(adv, expected)
    per_block = adv.abs().view(groups, b).mean(1)
    assert per_block[0] > 3 * per_block[1:].max()
    official = DagKL(1.0, 1e-4, 50.0, 0.0).block_advantages(-delta, groups).abs().view(groups, b).mean(1)
    assert official[0] < 2 * official[1:].max()  # per-block scales flatten it
    obj(terms)[0].backward()  # and it trains
