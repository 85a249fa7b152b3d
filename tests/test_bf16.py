"""bf16 end to end, as a GPU runs by default (model.dtype auto): frozen base weights and activations in bf16,
LoRA and flow weights and optimizer state in fp32, log-probs and losses in fp32.

bf16 arithmetic on a CPU is real only where ``lscpu`` shows ``amx_bf16``/``avx512_bf16``; elsewhere oneDNN computes
in fp32 and rounds (``ONEDNN_MAX_CPU_ISA=AVX2`` forces that on an AMX machine). So the bounds here compare what
training uses, on a smooth reward (a JPEG-size reward turns 1e-7 differences into byte flips), with margins taken
from measurements under emulated bf16 (docs/results/2026-12-05-bf16.md): not the value of a PPO-style surrogate
(≈ −mean(A), near zero by construction), which an earlier version of this test compared across two rollouts.
"""
import logging

import pytest
import torch

from fastdag.bench.precision import measure
from fastdag.trainer import Trainer
from test_trainer import tiny_cfg

SMOOTH = "reward.name=brightness"
# DAG-KL's "loss" and "kl_loss" hold the ratio-clipped surrogate: checked through its advantages and gradient below
LOSSES = {"db": ("loss", "db_loss", "prox"), "kl": ("db_loss", "prox"), "ddpo": ("loss",), "grpo": ("loss",)}
ALGORITHM = {a: [f"dag.algorithm={a}"] for a in ("db", "kl", "ddpo")} | {"grpo": ["dag.algorithm=grpo", "sample.group_size=2"]}
_FP32: dict[str, dict] = {}


def fp32_row(tmp_path, algorithm: str) -> dict:
    if algorithm not in _FP32:
        _FP32[algorithm] = Trainer(tiny_cfg(tmp_path, *ALGORITHM[algorithm], SMOOTH,
                                            "logging.run_name=fp32")).fit()[0]
    return _FP32[algorithm]


@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
@pytest.mark.parametrize("algorithm", ["db", "kl", "ddpo", "grpo"])
def test_bf16_epoch_is_finite_and_close_to_fp32(tmp_path, algorithm, engine):
    if engine == "deepspeed" and algorithm == "grpo":
        pytest.skip("GRPO's engine path is DDPO's")
    trainer = Trainer(tiny_cfg(tmp_path, *ALGORITHM[algorithm], "model.dtype=bfloat16", SMOOTH,
                               f"engine.backend={engine}", "engine.zero_stage=2"))
    assert trainer.model.unet.conv_in.weight.dtype == torch.bfloat16  # the frozen base runs in bf16
    trainable = [p for p in trainer.engine.module.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    row = trainer.fit()[0]
    ref = fp32_row(tmp_path, algorithm)
    assert all(torch.isfinite(torch.tensor(v)) for k, v in row.items() if k != "epoch")
    assert row["reward_mean"] == pytest.approx(ref["reward_mean"], abs=0.05)
    for key in LOSSES[algorithm]:
        assert row[key] == pytest.approx(ref[key], rel=0.05, abs=0.02), key
    # the rollout's recorded log p_F and the update's recomputed one come from the same computation
    assert row["logp_mismatch_max"] <= 1e-3 and row["logp_mismatch_mean"] <= row["logp_mismatch_max"]
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in trainable)  # updated, still fp32


def test_bf16_kl_advantages_and_gradients_follow_fp32():
    """The same fp32-sampled trajectories, evaluated by an fp32 and a bf16 trainer with the same weights.

    Measured under emulated bf16 (32 trajectories × 4 steps, brightness): advantage sign agreement 99.2%,
    correlation 0.990, mean |ΔA| 0.07 of A's spread within a step; gradient cosines KL-term LoRA 0.946, DB LoRA
    0.880, DB flow 0.996; bf16-rounded weights alone, in fp32 arithmetic, give 0.998 / 0.967 / 1.000. The bounds
    leave room for real bf16 arithmetic (each op's result rounded as here; accumulation differs).
    """
    result = measure(None, 16, [SMOOTH])
    adv = result["terms"]["advantage"]
    assert adv["sign_agreement"] >= 0.9 and adv["correlation"] >= 0.9, adv
    assert adv["mean_diff_over_block_std"] <= 0.25, adv
    assert result["terms"]["log_flow_t"]["mean_diff_over_block_std"] <= 0.1, result["terms"]["log_flow_t"]
    cos = result["grad_cosine"]
    assert cos["kl_lora"] >= 0.8 and cos["db_lora"] >= 0.7 and cos["db_flow"] >= 0.98, cos
    assert all(m["max"] <= 1e-3 for m in result["logp_mismatch"].values()), result["logp_mismatch"]


def test_a_recorded_log_pf_that_the_update_does_not_reproduce_is_logged_and_warned(tmp_path, caplog):
    trainer = Trainer(tiny_cfg(tmp_path, "dag.algorithm=ddpo", "train.epochs=2"))
    sample = trainer.sample_epoch

    def off_by_a_little():
        trajs = sample()
        trajs.log_pf += 0.01
        return trajs

    trainer.sample_epoch = off_by_a_little
    with caplog.at_level(logging.WARNING, logger="fastdag.trainer"):
        rows = trainer.fit()
    assert all(r["logp_mismatch_max"] == pytest.approx(0.01, rel=1e-3) for r in rows)
    assert all(r["logp_mismatch_mean"] == pytest.approx(0.01, rel=1e-3) for r in rows)
    warnings = [r for r in caplog.records if "logp_mismatch_max" in r.getMessage()]
    assert len(warnings) == 1  # once per run, not per epoch
