"""fastdag evaluate: a run's checkpoint evaluated afresh gives the trainer's own after-training evaluation, and
--base its before-training one (same prompts, same noise)."""
import json
import subprocess
import sys

import pytest

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
