"""Checkpoints that restore a run exactly, written so that a crash never leaves a broken one behind.

``checkpoints/epoch-NNNN/`` holds:

- ``pytorch_lora_weights.safetensors`` (the LoRA, diffusers format) and ``flow.safetensors``: for users (rank 0);
- ``engine/``: the trainable weights and the optimizer state, written by the engine (DeepSpeed: its own
  checkpoint, every process writing its ZeRO partition);
- ``trainer_state.pt`` (rank 0): completed epochs, the β-schedule horizon, the metrics rows so far, the
  before-training evaluation, the config and the number of processes;
- ``rank-NNNNN.pt``, one per process: every RNG state it owns and a digest of its trainable weights;
- ``checkpoint.json``, written last: a directory without it is not a checkpoint.

Every process writes into ``epoch-NNNN.tmp/``; after a barrier rank 0 flushes the files to disk, writes
``checkpoint.json`` and renames the directory into place (a rename is atomic on POSIX). A crash at any point
before the rename leaves only the ``.tmp`` directory, which resuming ignores and the next save clears, so the
previous checkpoint stays the latest complete one. All processes must see the same filesystem (one node, or a
filesystem shared by the nodes), as DeepSpeed's own checkpointing assumes.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors.torch import load_file, save_file

from fastdag.config import ConfigError
from fastdag.distributed import World, barrier

FLOW_WEIGHTS = "flow.safetensors"
TRAINER_STATE = "trainer_state.pt"
COMPLETE = "checkpoint.json"
ENGINE_DIR = "engine"
TMP_SUFFIX, OLD_SUFFIX = ".tmp", ".old"
_NAME = re.compile(r"^epoch-(\d+)$")
# Test hook: the name of a checkpoint (e.g. epoch-0002) whose save stalls after part of it is written, so a test
# can kill the run in the middle of a checkpoint write. Never set in normal use.
STALL_ENV = "FASTDAG_TEST_STALL_IN_SAVE"
STALL_MARKER = "STALLED"


def checkpoint_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}"


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of the trainable weights' bytes in name order: equal digests mean bit-identical weights."""
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def save_flow(directory: Path, flow: torch.nn.Module) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in flow.state_dict().items()}, str(directory / FLOW_WEIGHTS))


def load_flow(directory: Path, flow: torch.nn.Module) -> None:
    flow.load_state_dict(load_file(str(directory / FLOW_WEIGHTS)))


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` to disk, so the rename publishes complete data."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _stall_if_asked(directory: Path, tmp: Path) -> None:
    if os.environ.get(STALL_ENV) == directory.name:
        (tmp / STALL_MARKER).write_text(str(os.getpid()))
        time.sleep(600)


def save_checkpoint(directory: Path, world: World, *, every_rank: Callable[[Path], None],
                    main_rank: Callable[[Path], None], meta: dict[str, Any]) -> Path:
    """Write a checkpoint collectively (every process calls this): ``every_rank(tmp)`` on each process (its
    engine partition and rank file), ``main_rank(tmp)`` on rank 0 (weights for users, trainer state), then rank 0
    marks it complete with ``meta`` and publishes it by renaming ``tmp`` into ``directory``."""
    tmp = directory.with_name(directory.name + TMP_SUFFIX)
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt at the same checkpoint
        tmp.mkdir(parents=True)
    barrier()
    every_rank(tmp)
    if world.is_main:
        main_rank(tmp)
        _stall_if_asked(directory, tmp)
    barrier()  # every process's part is written
    if world.is_main:
        _fsync_tree(tmp)
        (tmp / COMPLETE).write_text(json.dumps(meta, indent=1))
        _fsync_tree(tmp)
        old = directory.with_name(directory.name + OLD_SUFFIX)
        if directory.exists():  # a checkpoint of the same epoch from an abandoned timeline: replace it
            shutil.rmtree(old, ignore_errors=True)
            directory.rename(old)
        tmp.rename(directory)
        _fsync_dir(directory.parent)
        shutil.rmtree(old, ignore_errors=True)
    barrier()  # no process moves on (or reads it) before it is published
    return directory


def complete_checkpoints(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """(epoch, path) of every complete checkpoint under ``checkpoints_dir``, oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for path in checkpoints_dir.iterdir():
        m = _NAME.match(path.name)
        if m and (path / COMPLETE).is_file():
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(checkpoints_dir: Path) -> Optional[Path]:
    found = complete_checkpoints(checkpoints_dir)
    return found[-1][1] if found else None


def prune_checkpoints(checkpoints_dir: Path, keep_last: int) -> list[Path]:
    """Rank 0, after a save: remove leftovers of crashed saves and, with ``keep_last`` > 0, every complete
    checkpoint but the newest ``keep_last``. Returns what was removed."""
    removed = [p for p in checkpoints_dir.iterdir() if p.name.endswith((TMP_SUFFIX, OLD_SUFFIX)) and p.is_dir()]
    if keep_last:
        removed += [path for _, path in complete_checkpoints(checkpoints_dir)[:-keep_last]]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def read_checkpoint(directory: Path, world: World) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainer state, this process's rank state) of a complete checkpoint written by as many processes as this
    run has; anything else is a ConfigError naming the problem."""
    if not (directory / COMPLETE).is_file():
        what = "an incomplete checkpoint (a save was interrupted)" if directory.is_dir() else "not a directory"
        raise ConfigError(f"train.resume: {directory} is {what}")
    meta = json.loads((directory / COMPLETE).read_text())
    if meta["world_size"] != world.size:
        raise ConfigError(f"train.resume: {directory} was written by {meta['world_size']} processes, this run has "
                          f"{world.size}; resume with the same number of processes")
    trainer_state = torch.load(directory / TRAINER_STATE, map_location="cpu", weights_only=False)
    rank_state = torch.load(directory / rank_file(world.rank), map_location="cpu", weights_only=False)
    return trainer_state, rank_state
