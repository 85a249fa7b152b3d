"""Data-parallel training: per-rank shares, world-size-invariant sampling and shuffling, launcher errors, and
2-process runs (torchrun and the deepspeed launcher, gloo) against a 1-process run with the same global batch."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import pytest
import torch
from safetensors.torch import load_file

from fastdag.config import ConfigError, load_config
from fastdag.distributed import World, shard
from fastdag.engine import check_engine
from fastdag.rollout import gaussian_rows
from fastdag.state_io import load_state
from fastdag.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs/tiny_random_compress.yaml"
# 8 trajectories per epoch (one rollout batch of 8), minibatches of 4: per process 4 trajectories, micro-batch 2.
RUN = ["train.epochs=2", "sample.num_steps=4", "train.batch_size=4", "reward.name=brightness",
       "logging.progress=false", "logging.grid_size=0"]
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# 1 vs 2 processes: the same trajectories and global minibatches, so the only differences are floating-point
# summation orders (a UNet batch of 2 vs 4, the mean over 4 vs the average of two means of 2, the gradient
# all-reduce). Measured after 2 epochs (4 AdamW steps at lr 3e-4, weights of magnitude ~1): max |Δ| 6.5e-6 for
# DAG-DB (ZeRO-2) and 2.0e-5 for DAG-KL (ZeRO-1; its 1e-4 ratio clip and std-normalised RLOO advantages amplify
# rounding). For contrast, a real difference in what is trained on moves the result much further: at
# train.batch_size 8, DAG-KL with dag.rloo_scope=rank (per-process baselines) ends 1.2e-3 from the 1-process
# run, with the global baseline 3.1e-5.
WEIGHT_ATOL = 1e-4
METRIC_RTOL = 1e-4


# ----- per-rank shares and world-size invariance (no processes) -------------------------------------------------
def test_shares_derive_from_global_sizes_and_refuse_uneven_splits():
    cfg = load_config(CONFIG, ["sample.num_batches_per_epoch=2", "train.gradient_accumulation_steps=2"])
    s = shard(cfg, World(rank=1, size=2), micro_steps_per_minibatch=10)
    assert (s.rollout_batch, s.train_batch, s.trajectories, s.micro_steps_per_update) == (4, 2, 8, 20)
    with pytest.raises(ConfigError, match=r"^sample.batch_size: 8 trajectories .* do not split over 3 processes"):
        shard(cfg, World(rank=0, size=3), 10)
    with pytest.raises(ConfigError, match=r"^train.batch_size: 4 trajectories .* do not split over 8 processes"):
        shard(load_config(CONFIG, ["sample.batch_size=8"]), World(rank=0, size=8), 10)
    kl = load_config(CONFIG, ["dag.algorithm=kl", "dag.rloo_scope=rank", "train.batch_size=4"])
    with pytest.raises(ConfigError, match="dag.rloo_scope: rank needs at least 3"):
        shard(kl, World(rank=0, size=2), 10)


def test_processes_share_the_single_process_noise_and_minibatches():
    """Rank r's noise rows and minibatches, mapped to global trajectory indices (r + world*i), are exactly the
    single process's: 2 processes sample and train on the same global minibatches as 1."""
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    one = gaussian_rows((8, 2), g(), torch.device("cpu"))
    two = [gaussian_rows((4, 2), g(), torch.device("cpu"), share=(r, 2)) for r in (0, 1)]
    assert torch.equal(torch.stack(two, 1).reshape(8, 2), one)

    cfg = load_config(CONFIG, ["sample.num_batches_per_epoch=3", "train.batch_size=4", "train.num_inner_epochs=2"])

    def plan(rank, world):
        fake = SimpleNamespace(world=World(rank, world), cfg=cfg, shuffle=torch.Generator().manual_seed(0),
                               num_train_steps=3)
        return Trainer.draw_plan(fake, 24 // world, num_steps=4)

    single = plan(0, 1)
    per_rank = [plan(r, 2) for r in (0, 1)]
    for inner in range(2):
        order, steps = single[inner]
        for m in range(6):  # 24 trajectories, minibatches of 4 (2 per process)
            together = {int(order[k]): steps[order[k]].tolist() for k in range(4 * m, 4 * m + 4)}
            split = {}
            for r, p in enumerate(per_rank):
                o, s = p[inner]
                for k in range(2 * m, 2 * m + 2):
                    split[r + 2 * int(o[k])] = s[o[k]].tolist()
            assert split == together


def test_engine_choices_this_launch_cannot_run_are_config_errors(monkeypatch):
    cpu = torch.device("cpu")
    with pytest.raises(ConfigError, match="engine.backend: torch runs a single process, but 2 were launched"):
        check_engine(load_config(None, ["engine.backend=torch"]), cpu, World(0, 2))
    with pytest.raises(ConfigError, match="engine.zero_stage: 3 is not supported"):
        check_engine(load_config(None, ["engine.zero_stage=3"]), cpu, World())
    adam8 = load_config(None, ["engine.optimizer=adamw8bit"])
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what a machine without the gpu extra has
    with pytest.raises(ConfigError, match="engine.optimizer: adamw8bit needs bitsandbytes"):
        check_engine(adam8, cpu, World())
    monkeypatch.setitem(sys.modules, "bitsandbytes", SimpleNamespace())  # installed, but no CUDA device here
    with pytest.raises(ConfigError, match="engine.optimizer: adamw8bit needs a CUDA device"):
        check_engine(adam8, cpu, World())


def test_uneven_split_stops_the_launch_with_one_line(tmp_path):
    """As the launcher would start rank 0 of 3: exit status 2, one line, before any process group forms."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    env.update(RANK="0", WORLD_SIZE="3", LOCAL_RANK="0")
    res = subprocess.run([sys.executable, "fastdag/train.py", "--config", str(CONFIG), *RUN,
                          f"logging.output_dir={tmp_path}"], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "fastdag: error: sample.batch_size: 8 trajectories (global, over all processes) do not split over 3 "
        "processes; use a multiple of 3"]


# ----- two processes ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(launcher: str, run_dir: Path, overrides: list[str]) -> None:
    bin_dir = Path(sys.executable).parent
    port = str(_free_port())
    if launcher == "torchrun":
        cmd = [str(bin_dir / "torchrun"), "--nproc_per_node", "2", "--master_port", port]
    else:  # on a CPU-only machine the deepspeed launcher takes --num_gpus as the number of local processes
        cmd = [str(bin_dir / "deepspeed"), "--num_gpus", "2", "--master_port", port]
    cmd += ["fastdag/train.py", "--config", str(CONFIG), *RUN, *overrides,
            f"logging.output_dir={run_dir.parent}", f"logging.run_name={run_dir.name}"]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return {f"{f}:{k}": v for f in ("pytorch_lora_weights.safetensors", "flow.safetensors")
            for k, v in load_file(str(checkpoint / f)).items()}


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# max_grad_norm 0.5: both gradient groups are clipped (norms ~0.7-1.3 here), so the per-group clip on ZeRO-2's
# partitions (the squared norm summed over the processes) is compared with one process's clip
TORCHRUN_DB = ["dag.algorithm=db", "engine.zero_stage=2", "train.max_grad_norm=0.5"]
DEEPSPEED_KL = ["dag.algorithm=kl", "dag.rloo_scope=global", "engine.zero_stage=1"]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """A 2-epoch run on 2 processes, checkpointed after each epoch; launched once per (launcher, overrides)."""
    runs = {}

    def get(launcher: str, overrides: list[str]) -> Path:
        key = (launcher, tuple(overrides))
        if key not in runs:
            runs[key] = tmp_path_factory.mktemp(launcher) / "two"
            _launch(launcher, runs[key], [*overrides, "checkpoint.every_n_epochs=1"])
        return runs[key]

    return get


def _digests(checkpoint: Path) -> list[str]:
    return [load_state(checkpoint / f"rank-0000{r}")["weights_digest"] for r in (0, 1)]


@pytest.mark.parametrize("launcher, overrides", [("torchrun", TORCHRUN_DB), ("deepspeed", DEEPSPEED_KL)])
def test_two_processes_match_one(tmp_path, two_process_run, launcher, overrides):
    two = two_process_run(launcher, overrides)
    ckpt = two / "checkpoints/epoch-0002"
    # both ranks end with the same LoRA and flow weights: each recorded a digest of its own in the checkpoint
    digests = _digests(ckpt)
    assert digests[0] == digests[1]
    assert json.loads((ckpt / "checkpoint.json").read_text())["world_size"] == 2

    one = Trainer(load_config(CONFIG, [*RUN, *overrides, f"logging.output_dir={tmp_path}", "logging.run_name=one"]))
    initial = {k: v.clone() for k, v in one.model.lora_state_dict().items()}
    one.fit()
    w1, w2 = _weights(tmp_path / "one/checkpoints/epoch-0002"), _weights(ckpt)
    assert w1.keys() == w2.keys()
    worst = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert worst <= WEIGHT_ATOL, f"1 vs 2 processes: max |Δweight| {worst:.3g}"
    moved = max((one.model.lora_state_dict()[k] - initial[k]).abs().max().item() for k in initial)
    assert moved > 5 * WEIGHT_ATOL, "training barely moved the LoRA: the comparison would prove nothing"
    for r1, r2 in zip(_rows(tmp_path / "one"), _rows(two), strict=True):
        for key in r1:
            if key.startswith("logp_mismatch"):  # rounding-level differences by construction: bounded, not equal
                assert r1[key] <= 1e-5 and r2[key] <= 1e-5, key
            elif not key.endswith("_seconds"):
                assert r2[key] == pytest.approx(r1[key], rel=METRIC_RTOL, abs=1e-7), key


def test_two_process_resume_is_exact(tmp_path, two_process_run):
    """Epoch 2 resumed on 2 processes from the epoch-1 checkpoint (each rank restores its ZeRO-2 partition and
    RNG states) ends bit-identical to the uninterrupted 2-process run, with the same metrics rows."""
    ref = two_process_run("torchrun", TORCHRUN_DB)
    resumed = tmp_path / "resumed"
    _launch("torchrun", resumed, [*TORCHRUN_DB, "checkpoint.every_n_epochs=1",
                                  f"train.resume={ref / 'checkpoints/epoch-0001'}"])
    without_wall_clock = lambda rows: [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in rows]  # noqa: E731
    assert without_wall_clock(_rows(resumed)) == without_wall_clock(_rows(ref))
    a, b = _weights(resumed / "checkpoints/epoch-0002"), _weights(ref / "checkpoints/epoch-0002")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _digests(resumed / "checkpoints/epoch-0002") == _digests(ref / "checkpoints/epoch-0002")


def _child_with_rank(parent: int, rank: int) -> Optional[int]:
    """The PID of ``parent``'s child process launched as RANK=``rank`` (Linux /proc), or None."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in environ:
            return int(stat.parent.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads Linux's /proc")
def test_the_rank_that_survives_a_killed_one_stops_with_the_resume_hint(tmp_path):
    """Rank 1 is killed while rank 0 writes the epoch-2 checkpoint; torchrun sends SIGTERM to the survivor, which
    exits with status 2 and the resume hint naming epoch 1 (it used to die of the signal, silently), and epoch 1
    stays a usable checkpoint."""
    from fastdag.checkpoint import STALL_ENV, STALL_MARKER, engine_meta, newest_usable_checkpoint

    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    env[STALL_ENV] = "epoch-0002"  # rank 0 stalls in that save, rank 1 waits for it at the barrier
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "fastdag/train.py", "--config", str(CONFIG), *RUN, *TORCHRUN_DB, "train.epochs=3",
           "checkpoint.every_n_epochs=1", f"logging.output_dir={tmp_path}", "logging.run_name=run"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    stalled = tmp_path / "run/checkpoints/epoch-0002.tmp" / STALL_MARKER
    deadline = time.monotonic() + 400
    while not stalled.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the epoch-2 save did not start in 400 s"
        time.sleep(0.1)
    rank1 = _child_with_rank(proc.pid, 1)
    assert rank1 is not None
    os.kill(rank1, signal.SIGKILL)
    _, err = proc.communicate(timeout=180)
    hint = (f"fastdag: terminated (SIGTERM); {tmp_path}/run/checkpoints/epoch-0001 is the latest checkpoint: continue "
            f"with train.resume=latest logging.output_dir={tmp_path} logging.run_name=run")
    assert hint in err.splitlines(), err[-3000:]
    assert re.search(r"rank\s*: 0 \(local_rank: 0\)\s*\n\s*exitcode\s*: 2 ", err), err[-3000:]  # torchrun's summary
    latest, _ = newest_usable_checkpoint(tmp_path / "run/checkpoints", World(size=2), engine_meta("deepspeed", 2))
    assert latest == tmp_path / "run/checkpoints/epoch-0001"
