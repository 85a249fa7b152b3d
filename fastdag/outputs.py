"""What a run leaves behind: its directory, ``config.yaml``, ``metrics.jsonl``, sample grids, checkpoints; and
the lock that gives a run directory to one run at a time."""
from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import socket
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from fastdag.config import Config, ConfigError, save_config

log = logging.getLogger(__name__)
LOCK_FILE = ".fastdag-lock"


def make_run_dir(cfg: Config, write_config: bool = True) -> Path:
    """The run directory, created and locked (rank 0 only). A named run's directory was locked by the pre-flight
    check already; an unnamed run gets a fresh one."""
    name = cfg.logging.run_name or f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.dag.algorithm}"
    run_dir = Path(cfg.logging.output_dir).expanduser() / name
    if cfg.logging.run_name:
        run_dir.mkdir(parents=True, exist_ok=True)
    else:  # never into an earlier run's directory, even one started the same second: mkdir is the atomic claim
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        k = 1
        while True:
            try:
                run_dir.mkdir()
                break
            except FileExistsError:
                k += 1
                run_dir = run_dir.with_name(f"{name}-{k}")
    lock_run_dir(run_dir)
    if write_config:
        save_config(cfg, run_dir / "config.yaml")
    return run_dir


@dataclass
class RunLock:
    """A run directory held by this process: an exclusive ``flock`` on ``RUN_DIR/.fastdag-lock``, whose text names
    the holder (PID, host, start time) for a run that is refused. The kernel drops an flock when its process ends,
    however it ends (kill -9 included), so a lock whose holder died is free: the next run takes it over, and the
    stale file with it. Data-parallel runs: rank 0 holds it for the whole process group."""

    run_dir: Path
    fd: int
    made_dir: bool  # this process created the directory: removed again if the run leaves it empty
    pid: int

    def release(self) -> None:
        if self.pid != os.getpid() or self.fd < 0:  # a forked child does not own its parent's lock
            return
        _held.pop(self.run_dir, None)
        # unlinked while still locked: a run that opened the old file re-checks the path after locking (below)
        with contextlib.suppress(OSError):
            (self.run_dir / LOCK_FILE).unlink()
        if self.made_dir:
            with contextlib.suppress(OSError):
                self.run_dir.rmdir()  # only if empty: a refused run leaves nothing behind
        os.close(self.fd)
        self.fd = -1


_held: dict[Path, RunLock] = {}


def lock_run_dir(run_dir: Path, key: str = "logging.run_name") -> Optional[RunLock]:
    """Take ``run_dir`` (created if missing) for this process, or a ConfigError naming the process that holds it.
    Re-entrant within a process (a Trainer built twice for one directory in one interpreter). None where the
    filesystem has no locks (a warning says the directory is unprotected)."""
    made = False
    while True:
        try:
            run_dir.mkdir(parents=True)
            made = True
        except FileExistsError:
            pass
        key_dir = run_dir.resolve()
        held = _held.get(key_dir)
        if held is not None and held.pid == os.getpid() and held.fd >= 0:
            return held
        path = key_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"{key}: {run_dir} is in use by another fastdag run ({_holder(path)}); wait for it to "
                              f"end, or use another {key}") from None
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            log.warning("%s: this filesystem has no file locks (%s); nothing stops a second run from writing into "
                        "%s", key, e.strerror, run_dir)
            return None
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)  # the holder removed that file as it ended: lock the path's new file
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(record).encode())
    lock = _held[key_dir] = RunLock(key_dir, fd, made, os.getpid())
    return lock


def _holder(path: Path) -> str:
    """Who holds the lock file at ``path``, from its text (written just after the flock is taken: read again
    briefly while it is still empty)."""
    record: Any = None
    for _ in range(20):
        try:
            record = json.loads(path.read_text())
            break
        except (OSError, ValueError):
            time.sleep(0.05)
    if not isinstance(record, dict) or not isinstance(record.get("pid"), int):
        return "holder unknown"
    pid, host = record["pid"], str(record.get("host"))
    where = f"PID {pid} on host {host}, since {record.get('started')}"
    if host == socket.gethostname() and not _alive(pid):  # the flock outlives its process only in a child
        where += f"; PID {pid} has ended, but a process it started still holds the lock"
    return where


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def release_run_dir(run_dir: Optional[Path]) -> None:
    """Give ``run_dir`` back, if this process holds it."""
    if run_dir is not None:
        held = _held.get(Path(run_dir).resolve())
        if held is not None:
            held.release()


def release_run_dirs() -> None:
    """Give back every run directory this process holds (the CLI on any exit; a Trainer that failed while being
    built never reached the ``fit`` that would have)."""
    for lock in list(_held.values()):
        lock.release()


atexit.register(release_run_dirs)


class MetricsLog:
    """Appends one JSON object per epoch to ``metrics.jsonl`` (rank 0 only)."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(finite_or_null(row), allow_nan=False) + "\n")

    def rewrite(self, rows: list[dict[str, Any]]) -> None:
        """Replace the file with ``rows`` (a resumed run: the checkpoint's rows), atomically by a rename."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(finite_or_null(row), allow_nan=False) + "\n" for row in rows))
        tmp.replace(self.path)

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def finite_or_null(row: dict[str, Any]) -> dict[str, Any]:
    """NaN and ±inf as null: JSON has no such numbers, and a file with them is not JSON any more."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


def sample_grid(images: torch.Tensor, captions: list[str], cell: int = 128, columns: Optional[int] = None) -> Image.Image:
    """images float [N, 3, H, W] in [0, 1] -> one PNG-ready picture, each image upscaled to ``cell`` pixels with
    its caption (prompt and reward) written under it."""
    n = images.shape[0]
    columns = columns or min(n, 4)
    rows = math.ceil(n / columns)
    text_h = 40
    font = ImageFont.load_default()
    grid = Image.new("RGB", (columns * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for k in range(n):
        r, c = divmod(k, columns)
        tile = Image.fromarray(np.ascontiguousarray(arr[k])).resize((cell, cell), Image.NEAREST)
        grid.paste(tile, (c * cell, r * (cell + text_h)))
        lines = textwrap.wrap(captions[k], width=cell // 6)[:3]
        draw.multiline_text((c * cell + 2, r * (cell + text_h) + cell + 1), "\n".join(lines), fill="black", font=font)
    return grid


def save_sample_grid(path: Path, images: torch.Tensor, prompts: list[str], rewards: torch.Tensor) -> None:
    captions = [f"{p} | r={r:.3g}" for p, r in zip(prompts, rewards.tolist())]
    sample_grid(images, captions).save(path)
