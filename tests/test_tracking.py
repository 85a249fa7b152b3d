"""logging.tracker: the metrics rows, sample grids and config reach TensorBoard's event files; a missing
package is one line."""
import sys
from pathlib import Path

import pytest

from fastdag.config import ConfigError, load_config
from fastdag.tracking import NoTracker, build_tracker
from fastdag.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


def _cfg(tmp_path, *overrides):
    return load_config(REPO / "configs/tiny_random_compress.yaml", [
        "train.epochs=2", "sample.num_steps=3", "sample.batch_size=4", "train.batch_size=4", "reward.name=brightness",
        "logging.progress=false", "logging.grid_size=4", "engine.backend=torch", f"logging.output_dir={tmp_path}",
        "logging.run_name=run", *overrides])


def test_tensorboard_gets_rows_grids_and_config(tmp_path):
    pytest.importorskip("tensorboard", reason="the tracking extra (tensorboard) is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = Trainer(_cfg(tmp_path, "logging.tracker=tensorboard")).fit()
    events = EventAccumulator(str(tmp_path / "run/tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = events.Tags()
    for key in ("reward_mean", "reward_std", "loss", "beta", "rollout_seconds"):
        assert key in tags["scalars"], key
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert got == [(r["epoch"], pytest.approx(r[key], rel=1e-6)) for r in rows], key
    assert [e.step for e in events.Images("samples")] == [1, 2]
    assert "config/text_summary" in tags["tensors"]
    assert b"tracker: tensorboard" in events.Tensors("config/text_summary")[0].tensor_proto.string_val[0]


def test_no_tracker_by_default(tmp_path):
    assert load_config(None, []).logging.tracker == "none"
    assert isinstance(build_tracker("none", tmp_path, {}), NoTracker)
    with pytest.raises(ConfigError, match=r"logging.tracker: must be one of none \| tensorboard \| wandb, got 'mlflow'"):
        load_config(None, ["logging.tracker=mlflow"])


def test_missing_package_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if absent
    monkeypatch.setitem(sys.modules, "wandb", None)
    for name in ("tensorboard", "wandb"):
        with pytest.raises(ConfigError, match=rf"logging.tracker: {name} needs the {name} package: pip install"):
            build_tracker(name, tmp_path, {})


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the tracking extra (wandb) is not installed")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    Trainer(_cfg(tmp_path, "logging.tracker=wandb", "train.epochs=1")).fit()
    assert list((tmp_path / "run/wandb").glob("offline-run-*"))
