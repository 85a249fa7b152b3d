"""The embedded default end to end: the shipped shapes-tiny pipeline through plain diffusers and the trainer."""
import json
from pathlib import Path

import pytest

from fastdag.config import load_config
from fastdag.toy.pretrain import SHIPPED_DIR
from fastdag.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not (SHIPPED_DIR / "model_index.json").is_file(), reason="shapes-tiny is not shipped yet (issue 3)"
)


TINY_BUDGET = [
    "sample.num_steps=4", "sample.batch_size=4", "sample.num_batches_per_epoch=1", "train.batch_size=4",
    "train.gradient_accumulation_steps=1", "train.timesteps_per_micro_step=2", "train.timestep_fraction=0.5",
    "eval.samples_per_prompt=1", "eval.num_steps=2", "engine.backend=torch", "logging.progress=false",
]


def test_shapes_tiny_loads_offline(monkeypatch) -> None:
    from diffusers import StableDiffusionPipeline

    from fastdag.assets import PIPELINES

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = StableDiffusionPipeline.from_pretrained(PIPELINES["shapes-tiny"](), local_files_only=True)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size


@pytest.mark.parametrize("task", ["align", "compress", "aesthetic"])
def test_shapes_task_runs_three_epochs(task: str, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config(REPO / f"configs/shapes_{task}.yaml", [
        "train.epochs=3", *TINY_BUDGET, f"logging.output_dir={tmp_path}", f"logging.run_name={task}",
    ])
    trainer = Trainer(cfg)
    rows = trainer.fit()
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    if task != "compress":
        assert all(r["reward_max"] <= 0 for r in rows)  # log-probabilities
    for name in ("before", "after"):
        scores = trainer.evaluations[name].scores
        assert 0 <= scores["judge_realism"] <= 1 and 0 <= scores["judge_stated_accuracy"] <= 1
        assert 0 <= scores["judge_kind_accuracy"] <= 1 and 0 <= scores["judge_taste"] <= 1
    run = tmp_path / task
    report = (run / "report.md").read_text()
    assert "judge_stated_accuracy" in report and (run / "samples_before.png").is_file()
    # The judge's figures before and after, and bar charts of what the prompts leave out.
    evaluation = json.loads((run / "evaluation.json").read_text())
    assert set(evaluation) == {"before", "after"}
    for figures in evaluation.values():
        assert 0 <= figures["taste_rate"] <= 1 and 0 <= figures["realism"] <= 1 and figures["frechet_distance"] > 0
        assert "background" in figures["unstated"] and figures["stated_accuracy"]["kind"] is not None
    assert "taste_rate" in report and (run / "unstated_attributes.png").is_file()


def test_the_judge_sees_a_hacked_reward_break_the_samples(tmp_path, monkeypatch) -> None:
    """A deliberately hackable reward (JPEG incompressibility: noise pays) and a few epochs of DAG-DB at a large
    learning rate: the reward rises and the samples stop being renders. The judge, which no reward trains
    against, sees it: its realism falls (measured: 0.93 -> 0.38 at these settings, seed 0) and the Fréchet
    distance of its features to true renders of the prompts grows."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config(REPO / "configs/shapes_compress.yaml", [
        "reward.name=jpeg_incompressibility", "train.epochs=8", "sample.num_steps=10", "sample.batch_size=16",
        "sample.num_batches_per_epoch=1", "train.batch_size=16", "train.timestep_fraction=1.0",
        "train.learning_rate=1e-2", "dag.beta_schedule=constant", "eval.num_steps=10", "eval.samples_per_prompt=4",
        "engine.backend=torch", "logging.progress=false", "logging.grid_size=0", f"logging.output_dir={tmp_path}",
        "logging.run_name=hack", "checkpoint.save_final=false",
    ])
    trainer = Trainer(cfg)
    rows = trainer.fit()
    before, after = trainer.evaluations["before"].scores, trainer.evaluations["after"].scores
    assert after["reward"] > before["reward"] and rows[-1]["reward_mean"] > rows[0]["reward_mean"]
    assert before["judge_realism"] > 0.85 and after["judge_realism"] < before["judge_realism"] - 0.25
    # The samples moved away from true renders of their prompts in the judge's feature space.
    frechet = [trainer.evaluations[k].summary["frechet_distance"] for k in ("before", "after")]
    assert frechet[1] > 1.2 * frechet[0]  # measured 378 -> 533 (12 samples: both carry the small-sample bias)
