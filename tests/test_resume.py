"""Checkpoints restore everything: a resumed run continues exactly as the uninterrupted run, also after SIGKILL
during training or during a checkpoint write; keep-last pruning; resume errors."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastdag.checkpoint import STALL_ENV, STALL_MARKER, complete_checkpoints
from fastdag.config import ConfigError, load_config
from fastdag.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]

# Tiny, with a linear β schedule (so the schedule position matters) and a checkpoint every epoch.
RUN = [
    "train.epochs=4", "sample.num_steps=4", "sample.batch_size=4", "sample.num_batches_per_epoch=1",
    "train.batch_size=2", "train.gradient_accumulation_steps=1", "dag.beta=10", "dag.beta_schedule=linear",
    "dag.flow.block_out_channels=[32,64]", "dag.flow.norm_num_groups=8", "reward.name=brightness",
    "logging.progress=false", "logging.grid_size=0", "checkpoint.every_n_epochs=1",
    "engine.backend=deepspeed", "engine.zero_stage=2",
]
WALL_CLOCK = ("rollout_seconds", "update_seconds")


def cfg(tmp_path, name, *overrides):
    return load_config(None, [*RUN, f"logging.output_dir={tmp_path}", f"logging.run_name={name}", *overrides])


def rows_of(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock columns (the only ones that may differ between runs)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in rows]


def weights_of(checkpoint: Path) -> dict[str, torch.Tensor]:
    return {f"{f}:{k}": v for f in ("pytorch_lora_weights.safetensors", "flow.safetensors")
            for k, v in load_file(str(checkpoint / f)).items()}


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights_of(a), weights_of(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Epochs 1-4 in one uninterrupted run (DeepSpeed ZeRO-2, single process)."""
    out = tmp_path_factory.mktemp("reference")
    Trainer(cfg(out, "ref")).fit()
    return out / "ref"


@pytest.mark.parametrize("extra", [[], ["engine.backend=torch", "dag.algorithm=kl", "train.batch_size=4"]],
                         ids=["deepspeed-db", "torch-kl"])
def test_resume_gives_the_uninterrupted_run(tmp_path, extra, reference):
    """Epochs 1-4 in one run vs epochs 1-2, then a fresh Trainer resumed from the epoch-2 checkpoint for 3-4:
    identical metrics.jsonl rows (wall-clock columns aside) and bit-identical LoRA and flow weights."""
    if extra:
        Trainer(cfg(tmp_path, "ref", *extra)).fit()
        ref = tmp_path / "ref"
    else:
        ref = reference
    resumed = Trainer(cfg(tmp_path, "resumed", f"train.resume={ref / 'checkpoints/epoch-0002'}", *extra))
    assert resumed.epoch == 0
    rows = resumed.fit()
    assert resumed.epoch == 4 and [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert rows_of(tmp_path / "resumed") == rows_of(ref)
    assert [r["beta"] for r in rows_of(ref)] == [0.0, 5.0, 10.0, 10.0]  # the β schedule really moved
    assert_same_weights(tmp_path / "resumed/checkpoints/epoch-0004", ref / "checkpoints/epoch-0004")
    # and the run did change the weights after the resume (else the equality would prove nothing)
    before, after = weights_of(ref / "checkpoints/epoch-0002"), weights_of(ref / "checkpoints/epoch-0004")
    assert any(not torch.equal(before[k], after[k]) for k in before)


# A launcher's variables, which an in-process DeepSpeed run in this pytest process has set for itself.
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def fresh_env(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}, **extra}


def test_a_longer_resumed_run_keeps_the_beta_schedule(tmp_path, reference):
    rows = Trainer(cfg(tmp_path, "longer", "train.epochs=6", "checkpoint.every_n_epochs=0",
                       f"train.resume={reference / 'checkpoints/epoch-0002'}")).fit()
    assert [r["beta"] for r in rows] == [0.0, 5.0, 10.0, 10.0, 10.0, 10.0]  # annealed over the original 4 epochs
    assert rows_of(tmp_path / "longer")[:4] == rows_of(reference)


def test_resume_refuses_a_checkpoint_it_cannot_continue(tmp_path, reference):
    import shutil

    from fastdag.checkpoint import read_checkpoint
    from fastdag.distributed import World

    other = tmp_path / "epoch-0002"
    shutil.copytree(reference / "checkpoints/epoch-0002", other)
    meta = json.loads((other / "checkpoint.json").read_text())
    (other / "checkpoint.json").write_text(json.dumps({**meta, "world_size": 2}))
    with pytest.raises(ConfigError, match="written by 2 processes, this run has 1; resume with the same number"):
        read_checkpoint(other, World())
    with pytest.raises(ConfigError, match=r"^train.resume: .* was trained with lora=\{'rank': 4, .*this config has "
                                          r"\{'rank': 8"):
        Trainer(cfg(tmp_path, "run", "lora.rank=8", f"train.resume={reference / 'checkpoints/epoch-0002'}")).fit()


def _train_cli(tmp_path, *overrides, env=None):
    return subprocess.Popen(
        [sys.executable, "-m", "fastdag.cli", "train", *RUN, f"logging.output_dir={tmp_path}", "logging.run_name=run",
         *overrides],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=fresh_env(**(env or {})), cwd=REPO,
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {path} appeared:\n{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.02)


def _kill(proc: subprocess.Popen) -> None:
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def _resume_to_the_end(tmp_path, reference, expect_from: str, extra: tuple[str, ...] = (), epochs: int = 4) -> None:
    proc = _train_cli(tmp_path, *extra, "train.resume=latest")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert f"resumed from {tmp_path / 'run/checkpoints' / expect_from} " in err, err[-2000:]
    run = tmp_path / "run"
    assert rows_of(run) == rows_of(reference)  # epochs 1..N, each once, as the uninterrupted run
    assert_same_weights(run / f"checkpoints/epoch-{epochs:04d}", reference / f"checkpoints/epoch-{epochs:04d}")
    assert [e for e, _ in complete_checkpoints(run / "checkpoints")] == list(range(1, epochs + 1))
    assert not list((run / "checkpoints").glob("*.tmp")), "the crashed save's leftovers are cleared"


def test_sigkill_during_training_resumes_from_the_last_complete_checkpoint(tmp_path, reference):
    proc = _train_cli(tmp_path)
    _wait_for(tmp_path / "run/checkpoints/epoch-0001/checkpoint.json", proc)
    _kill(proc)  # during epoch 2's rollout or update
    done = complete_checkpoints(tmp_path / "run/checkpoints")
    assert done and done[-1][0] < 4
    _resume_to_the_end(tmp_path, reference, expect_from=done[-1][1].name)


def test_sigkill_during_a_checkpoint_write_resumes_from_the_previous_one(tmp_path, reference):
    proc = _train_cli(tmp_path, env={STALL_ENV: "epoch-0002"})  # the epoch-2 save stalls half-written
    tmp_dir = tmp_path / "run/checkpoints/epoch-0002.tmp"
    _wait_for(tmp_dir / STALL_MARKER, proc)
    _kill(proc)
    assert (tmp_dir / "engine").is_dir() and (tmp_dir / "flow.safetensors").is_file()  # really half-written
    assert not (tmp_path / "run/checkpoints/epoch-0002").exists()
    assert [e for e, _ in complete_checkpoints(tmp_path / "run/checkpoints")] == [1]
    _resume_to_the_end(tmp_path, reference, expect_from="epoch-0001")


def test_keep_last_prunes_older_checkpoints(tmp_path):
    Trainer(cfg(tmp_path, "run", "engine.backend=torch", "train.epochs=3", "checkpoint.keep_last=2")).fit()
    assert [e for e, _ in complete_checkpoints(tmp_path / "run/checkpoints")] == [2, 3]


def test_resume_latest_without_a_checkpoint_starts_fresh(tmp_path):
    rows = Trainer(cfg(tmp_path, "run", "engine.backend=torch", "train.epochs=1", "train.resume=latest")).fit()
    assert [r["epoch"] for r in rows] == [1]


def test_resume_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="train.resume: latest needs logging.run_name"):
        Trainer(load_config(None, [*RUN, "train.resume=latest"]))
    with pytest.raises(ConfigError, match="neither latest nor a checkpoint directory"):
        Trainer(cfg(tmp_path, "run", f"train.resume={tmp_path / 'nope'}"))
    half = tmp_path / "half"
    half.mkdir()
    with pytest.raises(ConfigError, match="incomplete checkpoint"):  # found before the model loads
        Trainer(cfg(tmp_path, "run", f"train.resume={half}", "engine.backend=torch"))
