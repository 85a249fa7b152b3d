"""A run directory belongs to one run: two real `fastdag train` processes started together on one run name give one
run and one refusal (never two runs' rows in one metrics.jsonl); a run or a resume while another process holds the
directory is refused with one line naming that process; a dead holder's lock is taken over; data-parallel ranks
other than 0 do not lock. SIGTERM stops a real run like Ctrl-C and its checkpoint resumes."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastdag.checkpoint import engine_meta, newest_usable_checkpoint
from fastdag.config import ConfigError, load_config
from fastdag.distributed import World
from fastdag.outputs import LOCK_FILE, lock_run_dir, release_run_dir
from fastdag.preflight import check_run_dir

REPO = Path(__file__).resolve().parents[1]
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# The tiny config, on the torch engine (no DeepSpeed start-up) and without sample grids.
TINY = ["--config", str(REPO / "configs/tiny_random_compress.yaml"), "sample.num_steps=4",
        "checkpoint.every_n_epochs=1", "engine.backend=torch", "logging.progress=false", "logging.grid_size=0",
        "reward.name=brightness"]
HOLD = ("import sys, time\nfrom pathlib import Path\nfrom fastdag.outputs import lock_run_dir\n"
        "for d in sys.argv[1:]:\n    lock_run_dir(Path(d))\nprint('held', flush=True)\ntime.sleep(600)\n")


def env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}


def hold(*run_dirs: Path) -> subprocess.Popen:
    """Another process holding these run directories, as a running `fastdag train` does."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, *map(str, run_dirs)], stdout=subprocess.PIPE, text=True,
                            cwd=REPO, env=env())
    assert proc.stdout.readline().strip() == "held"
    return proc


def train(out: Path, name: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fastdag.cli", "train", *TINY, f"logging.output_dir={out}",
                             f"logging.run_name={name}", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO, env=env())


def cfg(out: Path, *overrides: str):
    return load_config(REPO / "configs/tiny_random_compress.yaml",
                       [f"logging.output_dir={out}", "logging.run_name=run", *overrides])


def test_a_held_directory_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(tmp_path):
    run = tmp_path / "run"
    holder = hold(run)
    try:
        for resume in ([], ["train.resume=latest"]):
            with pytest.raises(ConfigError) as err:
                check_run_dir(cfg(tmp_path, *resume), run)
            assert str(err.value).startswith(f"logging.run_name: {run} is in use by another fastdag run (PID "
                                             f"{holder.pid} on host {socket.gethostname()}, since ")
        check_run_dir(cfg(tmp_path), run, World(rank=1, size=2))  # rank 1 of the holder's group: not refused
    finally:
        holder.kill()  # kill -9: no chance to clean up
        holder.wait()
    assert (run / LOCK_FILE).exists()  # the dead holder's file stays, but its flock went with it
    check_run_dir(cfg(tmp_path), run)  # taken over: the stale lock is not a run either
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert lock_run_dir(run) is lock_run_dir(run)  # re-entrant in one process
    release_run_dir(run)
    assert not (run / LOCK_FILE).exists()


def test_a_refused_run_leaves_no_directory_behind(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    with pytest.raises(ConfigError, match="already holds a run"):
        check_run_dir(cfg(tmp_path), tmp_path / "run")
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["metrics.jsonl"]
    lock_run_dir(tmp_path / "fresh")
    release_run_dir(tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()  # made for the lock, left empty: removed


def test_two_runs_started_together_on_one_name_give_one_run(tmp_path):
    """The issue's race: epochs 2 and 3 on one run name at once. Before the lock both exited 0 and metrics.jsonl
    held epochs 1, 1, 2, 2, 3."""
    procs = {epochs: train(tmp_path, "twin", f"train.epochs={epochs}") for epochs in (2, 3)}
    done = {epochs: (p.wait(timeout=600), p.stderr.read(), p.pid) for epochs, p in procs.items()}
    for p in procs.values():
        p.stdout.close()
        p.stderr.close()
    assert sorted(rc for rc, _, _ in done.values()) == [0, 2], {k: (rc, e[-1500:]) for k, (rc, e, _) in done.items()}
    winner = next(epochs for epochs, (rc, _, _) in done.items() if rc == 0)
    loser_err = next(err for rc, err, _ in done.values() if rc == 2)
    lines = [line for line in loser_err.splitlines() if line.strip()]
    winner_pid = done[winner][2]
    assert len(lines) == 1 and (
        f"is in use by another fastdag run (PID {winner_pid} on host {socket.gethostname()}" in lines[0]
        or "already holds a run" in lines[0]), lines  # the second one either came while or after the first ran
    rows = [json.loads(line) for line in (tmp_path / "twin/metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, winner + 1))
    assert load_config(tmp_path / "twin/config.yaml").train.epochs == winner
    assert sorted(p.name for p in (tmp_path / "twin/checkpoints").iterdir()) == \
        [f"epoch-{e:04d}" for e in range(1, winner + 1)]
    assert not (tmp_path / "twin" / LOCK_FILE).exists()


def test_sigterm_stops_a_run_like_ctrl_c_and_a_resume_waits_its_turn(tmp_path):
    """A long run; a resume of it while it runs is refused naming it; SIGTERM (what `timeout`, Slurm and Kubernetes
    send) ends it with exit status 2 and the resume hint; then the resume runs from that checkpoint."""
    first = tmp_path / "run/checkpoints/epoch-0001/checkpoint.json"
    proc = train(tmp_path, "run", "train.epochs=1000")
    deadline = time.monotonic() + 300
    while not first.exists():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint in 300 s"
        time.sleep(0.05)
    second = train(tmp_path, "run", "train.resume=latest")
    _, err = second.communicate(timeout=300)
    assert second.returncode == 2
    assert err.strip().splitlines() == [
        f"fastdag: error: logging.run_name: {tmp_path / 'run'} is in use by another fastdag run (PID {proc.pid} on "
        f"host {socket.gethostname()}, since " + err.split(", since ")[1].strip()], err
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    m = re.match(rf"fastdag: terminated \(SIGTERM\); {re.escape(str(tmp_path))}/run/checkpoints/(epoch-(\d{{4}})) is "
                 rf"the latest checkpoint: continue with train.resume=latest logging.output_dir="
                 rf"{re.escape(str(tmp_path))} logging.run_name=run$", last)
    assert m, last
    latest, _ = newest_usable_checkpoint(tmp_path / "run/checkpoints", World(), engine_meta("torch", 0))
    assert latest is not None and latest.name == m.group(1)  # intact: complete and readable
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    epochs = int(m.group(2)) + 1
    resumed = train(tmp_path, "run", "train.resume=latest", f"train.epochs={epochs}")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))
