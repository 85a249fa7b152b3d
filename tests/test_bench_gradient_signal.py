"""fastdag.bench.gradient_signal: the split-group estimate of signal vs noise in the DB policy gradient."""
import math

import pytest

from fastdag.bench import gradient_signal
from fastdag.bench.gradient_signal import trajectories_per_unit_snr

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_trajectories_per_unit_snr():
    # group sums of n trajectories with per-trajectory signal² / noise² = r have cosine n r / (n r + 1)
    n, r = 16, 0.01
    c = n * r / (n * r + 1)
    assert trajectories_per_unit_snr(c, n) == pytest.approx(1 / r)
    assert math.isinf(trajectories_per_unit_snr(0.0, n)) and math.isinf(trajectories_per_unit_snr(-0.1, n))


def test_measures_a_tiny_run_and_writes_markdown(tmp_path):
    out = tmp_path / "signal.md"
    gradient_signal.main(["--config", "configs/tiny_random_compress.yaml", "--trajectories", "8", "--groups", "2",
                          "--out", str(out), "sample.num_steps=4", "sample.batch_size=4"])
    text = out.read_text()
    assert "| db.uniform |" in text and "| kl.score_scale |" in text and text.count("\n| 3 |") == 1
    assert "| uniform | " in text and "db~kl" in text and "kl~reinforce" in text
    result = gradient_signal.measure("configs/tiny_random_compress.yaml", 8, 2, None,
                                     ["sample.num_steps=4", "sample.batch_size=4"])
    assert result["trajectories"] == 8  # sample.batch_size=4 from the overrides: two rollout batches
    for row in result["weightings"].values():
        assert -1 <= row["cosine"] <= 1 and sum(row["step_share"]) == pytest.approx(1.0)
    assert {"db.uniform", "kl.score_scale", "kl_pooled.uniform", "reinforce.score_scale"} <= set(result["weightings"])
    assert all(-1 <= c <= 1 for pairs in result["agreement"].values() for c in pairs.values())
    assert result["residual_abs_mean"] > 0


def test_measures_a_checkpoint_at_its_beta(tmp_path):
    from fastdag.config import load_config
    from fastdag.trainer import Trainer

    overrides = ["sample.num_steps=4", "sample.batch_size=4", "sample.num_batches_per_epoch=1", "train.batch_size=4",
                 "train.gradient_accumulation_steps=1", "train.epochs=2", "logging.progress=false",
                 "engine.backend=torch", "dag.flow.block_out_channels=[32,64]", "dag.flow.norm_num_groups=8"]
    Trainer(load_config("configs/tiny_random_compress.yaml", [*overrides, f"logging.output_dir={tmp_path}",
                                                                "logging.run_name=run", "checkpoint.every_n_epochs=1"])).fit()
    result = gradient_signal.measure("configs/tiny_random_compress.yaml", 8, 2, None,
                                     [*overrides, f"logging.output_dir={tmp_path}"],
                                     str(tmp_path / "run/checkpoints/epoch-0001"))
    cfg = load_config("configs/tiny_random_compress.yaml", overrides)
    assert result["beta"] == pytest.approx(cfg.dag.beta * min(1.0, 1 / (cfg.dag.anneal_fraction * 2)))


def test_refuses_other_objectives():
    with pytest.raises(SystemExit, match="dag.algorithm db or kl"):
        gradient_signal.measure("configs/tiny_random_compress.yaml", 8, 2, None,
                                ["sample.num_steps=4", "sample.batch_size=4", "dag.algorithm=ddpo"])
