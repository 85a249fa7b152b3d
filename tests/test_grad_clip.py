"""train.grad_clip: the official code clips the LoRA's and the flow network's gradients separately, each to
max_grad_norm; every engine does the same (torch AdamW, DeepSpeed ZeRO 0 and 2)."""
import pytest
import torch

from fastdag.engine import GroupClipper
from test_trainer import tiny_cfg
from fastdag.trainer import Trainer


def test_group_clipper_equals_clip_grad_norm_per_group():
    lora, flow = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3, 2))], [torch.nn.Parameter(torch.randn(4))]
    grads = [torch.randn(5) * 3, torch.randn(3, 2) * 3, torch.randn(4) * 0.01]  # the flow's norm is below the clip
    opt = torch.optim.SGD([{"params": lora, "name": "lora"}, {"params": flow, "name": "flow"}], lr=1.0)
    clipper = GroupClipper(opt, max_norm=1.0, partitioned=False)
    twins = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for t, g in zip(twins, grads):
        t.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(twins[:2], 1.0)  # the official code: one call per module
    torch.nn.utils.clip_grad_norm_(twins[2:], 1.0)
    expected = [t.grad for t in twins]
    assert not torch.allclose(expected[0], grads[0]) and torch.equal(expected[2], grads[2])
    for p, g in zip([*lora, *flow], grads):
        p.grad = g.clone()
    before = [p.detach().clone() for p in [*lora, *flow]]
    opt.step()
    for p, b, e in zip([*lora, *flow], before, expected):
        torch.testing.assert_close(b - p.detach(), e)  # SGD at lr 1 moved each parameter by its clipped gradient
    torch.testing.assert_close(clipper.norms["lora"], torch.cat([g.flatten() for g in grads[:2]]).norm())
    torch.testing.assert_close(clipper.norms["flow"], grads[2].norm())


def first_moment_norms(trainer) -> dict[str, float]:
    """‖exp_avg‖ per parameter group after the first AdamW step: (1 − β1) × that group's clipped gradient norm."""
    opt = trainer.engine.optimizer
    base = getattr(opt, "optimizer", opt)  # ZeRO wraps our AdamW; its groups then hold the flat fp32 partitions
    return {g["name"]: torch.cat([base.state[p]["exp_avg"].flatten() for p in g["params"]]).norm().item()
            for g in base.param_groups}


@pytest.mark.parametrize("engine", ["torch", "deepspeed-0", "deepspeed-2"])
def test_each_module_is_clipped_to_its_own_norm(tmp_path, engine):
    backend, _, stage = engine.partition("-")
    max_norm = 1e-4  # far below both gradients' norms: each group is clipped
    trainer = Trainer(tiny_cfg(tmp_path, f"engine.backend={backend}", f"engine.zero_stage={stage or 0}",
                               f"train.max_grad_norm={max_norm}", "dag.beta=100"))
    row = trainer.fit()[0]
    assert row["grad_norm_lora"] > 10 * max_norm and row["grad_norm_flow"] > 10 * max_norm
    assert row["grad_norm"] == pytest.approx((row["grad_norm_lora"] ** 2 + row["grad_norm_flow"] ** 2) ** 0.5, rel=1e-5)
    # joint clipping would give each group max_norm x (its share of the joint norm) instead
    for name, norm in first_moment_norms(trainer).items():
        assert norm == pytest.approx(0.1 * max_norm, rel=1e-3), name


def test_joint_clip_is_a_switch(tmp_path):
    max_norm = 1e-4
    trainer = Trainer(tiny_cfg(tmp_path, "train.grad_clip=joint", f"train.max_grad_norm={max_norm}", "dag.beta=100"))
    row = trainer.fit()[0]
    assert "grad_norm_lora" not in row
    norms = first_moment_norms(trainer)
    assert (norms["lora"] ** 2 + norms["flow"] ** 2) ** 0.5 == pytest.approx(0.1 * max_norm, rel=1e-3)
    assert min(norms.values()) < 0.09 * max_norm
