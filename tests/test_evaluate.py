"""fastdag evaluate: a run's checkpoint evaluated afresh gives the trainer's own after-training evaluation, and
--base its before-training one (same prompts, same noise)."""
import json
import subprocess
import sys

import pytest
import torch

from fastdag.config import ConfigError
from fastdag.evaluate import evaluate
from fastdag.trainer import Trainer
from test_trainer import REPO, tiny_cfg, without_launcher_env

RUN = ["reward.name=brightness", "eval.prompts=tiny", "eval.samples_per_prompt=1", "eval.num_steps=4",
       "train.learning_rate=3e-2", "train.epochs=2"]


def test_evaluate_reproduces_the_trainers_evaluations(tmp_path):
    trainer = Trainer(tiny_cfg(tmp_path, *RUN))
    trainer.fit()
    before, after = trainer.evaluations["before"].scores, trainer.evaluations["after"].scores
    assert after["reward"] != pytest.approx(before["reward"], abs=1e-6)  # training changed the samples
    run = tmp_path / "run"
    assert evaluate(str(run), [])["scores"]["reward"] == pytest.approx(after["reward"], rel=1e-5, abs=1e-6)
    assert evaluate(str(run / "checkpoints/epoch-0002"), [])["scores"]["reward"] == \
        pytest.approx(after["reward"], rel=1e-5, abs=1e-6)
    assert evaluate(str(run), [], base=True)["scores"]["reward"] == pytest.approx(before["reward"], rel=1e-5, abs=1e-6)
    with pytest.raises(ConfigError, match="neither a run directory"):
        evaluate(str(tmp_path), [])
    res = subprocess.run([sys.executable, "-m", "fastdag.cli", "evaluate", str(run), "eval.samples_per_prompt=1"],
                         capture_output=True, text=True, cwd=REPO, env=without_launcher_env(), timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    written = json.loads((run / "evaluation-epoch-0002.json").read_text())
    assert written["scores"]["reward"] == pytest.approx(after["reward"], rel=1e-5, abs=1e-6)


def test_clip_diversity_is_the_mean_pairwise_cosine_distance_per_prompt(tmp_path):
    from reward_testing import laion

    from fastdag.rewards import build_metric
    from fastdag.rewards.diversity import pairwise_cosine_distance

    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0], [5.0, 5.0]])
    d = pairwise_cosine_distance(e, ["a", "a", "a", "b", "c"])
    # prompt a: distances 1 (0-1), 1 - 1/√2 (0-2, 1-2); b alone; c alone.
    torch.testing.assert_close(d[:3], torch.tensor([1 + 0.29289, 1 + 0.29289, 2 * 0.29289]) / 2, atol=1e-4, rtol=0)
    assert d[3:].isnan().all()
    kwargs, _, _ = laion(tmp_path)
    metric = build_metric("clip_diversity", {"model": kwargs["model"], "device": "cpu"})
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    alike = metric(images[:1].expand(3, -1, -1, -1), ["x"] * 3)["clip_diversity"]
    assert alike.abs().max() < 1e-5  # identical samples: no diversity
    varied = metric(images, ["x"] * 3 + ["y"] * 3)["clip_diversity"]
    assert varied.shape == (6,) and (varied > 1e-4).all()
    with pytest.raises(ConfigError, match="metric_kwargs"):
        build_metric("clip_diversity", {"colour": "red"})
