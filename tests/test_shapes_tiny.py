"""The embedded default end to end: the shipped shapes-tiny pipeline through plain diffusers and the trainer."""
from pathlib import Path

import pytest

from fastdag.config import load_config
from fastdag.toy.pretrain import SHIPPED_DIR
from fastdag.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not (SHIPPED_DIR / "model_index.json").is_file(), reason="shapes-tiny is not shipped yet (issue 3)"
)


def test_shapes_tiny_loads_offline_and_trains_one_epoch(tmp_path, monkeypatch) -> None:
    from diffusers import StableDiffusionPipeline

    from fastdag.assets import PIPELINES

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = StableDiffusionPipeline.from_pretrained(PIPELINES["shapes-tiny"](), local_files_only=True)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    cfg = load_config(REPO / "configs/shapes_align.yaml", [
        "train.epochs=1", "sample.num_steps=4", "sample.batch_size=4", "sample.num_batches_per_epoch=1",
        "train.batch_size=4", "train.gradient_accumulation_steps=1", "train.timesteps_per_micro_step=2",
        "eval.samples_per_prompt=1", "eval.num_steps=2",
        "engine.backend=torch", "logging.progress=false", f"logging.output_dir={tmp_path}", "logging.run_name=shapes",
    ])
    trainer = Trainer(cfg)
    rows = trainer.fit()
    assert rows[0]["reward_max"] <= 0  # shapes_alignment is a mean log-probability
    for name in ("before", "after"):
        scores = trainer.evaluations[name].scores
        assert 0 <= scores["shapes_accuracy"] <= 1 and "colour_accuracy" in scores and "position_accuracy" in scores
    report = (tmp_path / "shapes/report.md").read_text()
    assert "shapes_accuracy" in report and (tmp_path / "shapes/samples_before.png").is_file()
