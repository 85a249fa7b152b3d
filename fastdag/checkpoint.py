"""Checkpoints that restore a run exactly, written so that a crash never leaves a broken one behind.

``checkpoints/epoch-NNNN/`` holds:

- ``pytorch_lora_weights.safetensors`` (the LoRA, diffusers format) and ``flow.safetensors``: for users (rank 0);
- ``engine/``: the trainable weights and the optimizer state, written by the engine (DeepSpeed: its own
  checkpoint, every process writing its ZeRO partition);
- ``trainer_state.json`` + ``.safetensors`` (rank 0): completed epochs, the β-schedule horizon, the metrics rows so
  far, the before-training evaluation, the config and the number of processes;
- ``rank-NNNNN.json`` + ``.safetensors``, one per process: every RNG state it owns and a digest of its trainable
  weights;
- ``checkpoint.json``, written last: a directory without it is not a checkpoint.

Nothing here is a pickle, so reading a checkpoint cannot run code (``fastdag.state_io``); DeepSpeed's own files
under ``engine/`` are read with ``torch.load(weights_only=True)`` and an allow-list. A checkpoint is checked
whole (every file of every process parses) before the model loads: ``resume=latest`` skips a damaged newest one
for the newest readable one, and says so.

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
from safetensors.torch import save_file

from fastdag.config import ConfigError
from fastdag.distributed import World, barrier

FLOW_WEIGHTS = "flow.safetensors"
TRAINER_STATE = "trainer_state"  # + .json / .safetensors (fastdag.state_io)
PICKLED_STATE = "trainer_state.pt"  # the pickle format of fastdag before checkpoints became code-free
COMPLETE = "checkpoint.json"
ENGINE_DIR = "engine"
TMP_SUFFIX, OLD_SUFFIX = ".tmp", ".old"
_NAME = re.compile(r"^epoch-(\d+)$")
# Test hook: the name of a checkpoint (e.g. epoch-0002) whose save stalls after part of it is written, so a test
# can kill the run in the middle of a checkpoint write. Never set in normal use.
STALL_ENV = "FASTDAG_TEST_STALL_IN_SAVE"
STALL_MARKER = "STALLED"


class DamagedCheckpoint(ConfigError):
    """A checkpoint with a file missing, truncated or unparsable (``resume=latest`` falls back past it)."""


def checkpoint_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}"


def rank_file(rank: int) -> str:
    """The stem of a process's state files (``.json`` + ``.safetensors``)."""
    return f"rank-{rank:05d}"


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
    """The flow network's weights from a checkpoint; a one-line ConfigError for a damaged or mismatched file."""
    from fastdag.state_io import load_tensors

    path = directory / FLOW_WEIGHTS
    try:
        flow.load_state_dict(load_tensors(path))
    except RuntimeError as e:  # missing, unexpected or differently shaped tensors: another dag.flow
        last = str(e).strip().splitlines()[-1].strip()[:200]
        raise ConfigError(f"{path}: flow weights for another dag.flow ({last})") from None


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
    meta = read_meta(directory)
    if meta["world_size"] != world.size:
        raise ConfigError(f"train.resume: {directory} was written by {meta['world_size']} processes, this run has "
                          f"{world.size}; resume with the same number of processes")
    trainer_state = _read_state(directory, TRAINER_STATE)
    rank_state = _read_state(directory, rank_file(world.rank))
    return trainer_state, rank_state


def read_meta(directory: Path) -> dict[str, Any]:
    """``checkpoint.json``: at least ``epoch`` and ``world_size`` (ints); a ConfigError if it is damaged."""
    try:
        meta = json.loads((directory / COMPLETE).read_text(encoding="utf-8"))
        ok = isinstance(meta, dict) and all(type(meta.get(k)) is int and meta[k] >= 0 for k in ("epoch", "world_size"))
    except (OSError, ValueError):
        ok = False
    if not ok:
        raise DamagedCheckpoint(f"train.resume: {directory} is damaged ({COMPLETE} is not a checkpoint record)")
    return meta


def _read_state(directory: Path, stem: str) -> Any:
    from fastdag.state_io import StateFormatError, load_state, state_files

    json_file = state_files(directory / stem)[0]
    if not json_file.is_file():
        if stem == TRAINER_STATE and (directory / PICKLED_STATE).exists():
            raise DamagedCheckpoint(f"train.resume: {directory} is in the pickle format of an earlier fastdag, which "
                                    "can run code when read; it is not loaded (train it again, or convert it where "
                                    "you trust it)")
        raise DamagedCheckpoint(f"train.resume: {directory} is incomplete (no {json_file.name})")
    try:
        return load_state(directory / stem)
    except (OSError, StateFormatError) as e:
        raise DamagedCheckpoint(f"train.resume: {directory} is damaged ({json_file.name}: {e})") from None


# What Trainer.save writes and Trainer.restore reads.
TRAINER_KEYS = ("epoch", "beta_horizon", "metrics", "evaluations", "config", "world_size")
RANK_KEYS = ("rng", "weights_digest")


def engine_meta(backend: str, zero_stage: int) -> dict[str, Any]:
    """The engine record of ``checkpoint.json``: a resume must use the engine (and ZeRO stage) that wrote it."""
    return {"backend": backend, "zero_stage": zero_stage if backend == "deepspeed" else None}


def check_checkpoint(directory: Path, world: World, engine: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Everything a resume from ``directory`` reads, checked without loading a model: the record, the trainer
    state, every process's rank state and engine files (so all processes agree on the verdict), and that the
    engine matches ``engine`` (see :func:`engine_meta`). Returns (trainer state, this process's rank state);
    :class:`DamagedCheckpoint` for damage, ConfigError for a checkpoint this run cannot continue."""
    trainer_state, rank_state = read_checkpoint(directory, world)
    own = ((TRAINER_STATE, trainer_state, TRAINER_KEYS), (rank_file(world.rank), rank_state, RANK_KEYS))
    for name, state, keys in own:
        if not isinstance(state, dict) or not set(keys) <= set(state):
            raise DamagedCheckpoint(f"train.resume: {directory} is damaged ({name}.json lacks {', '.join(keys)})")
    meta = read_meta(directory)
    for r in range(world.size):
        if r != world.rank:
            _read_state(directory, rank_file(r))
    saved = meta.get("engine")
    if not isinstance(saved, dict) or saved.get("backend") not in ("torch", "deepspeed"):
        raise DamagedCheckpoint(f"train.resume: {directory} is damaged ({COMPLETE} names no engine)")
    if saved["backend"] != engine["backend"]:
        raise ConfigError(f"train.resume: {directory} was written by the {saved['backend']} engine, this run uses "
                          f"{engine['backend']}; resume with engine.backend={saved['backend']}")
    if saved.get("zero_stage") != engine["zero_stage"]:
        raise ConfigError(f"train.resume: {directory} was written with ZeRO stage {saved.get('zero_stage')}, this run "
                          f"uses {engine['zero_stage']}; resume with engine.zero_stage={saved.get('zero_stage')}")
    _check_engine_files(directory / ENGINE_DIR, saved["backend"], world)
    return trainer_state, rank_state


def _check_engine_files(engine_dir: Path, backend: str, world: World) -> None:
    from fastdag.state_io import safe_torch_load

    if backend == "torch":
        _read_state(engine_dir, "torch_engine")
        return
    ds_dir = engine_dir / "deepspeed"
    files = [ds_dir / "mp_rank_00_model_states.pt"]
    optim = sorted(ds_dir.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt")) if ds_dir.is_dir() else []
    if optim:  # ZeRO 1/2: one optimizer partition per process
        files += [ds_dir / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world.size)]
    for f in files:
        if not f.is_file():
            raise DamagedCheckpoint(f"train.resume: {engine_dir.parent} is incomplete "
                                    f"(no {ENGINE_DIR}/deepspeed/{f.name})")
        try:
            safe_torch_load(f, map_location="cpu")
        except Exception as e:  # noqa: BLE001 - truncated zip, a refused pickle global, ...: all mean unusable
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DamagedCheckpoint(f"train.resume: {engine_dir.parent} is damaged ({f.name}: {first[:200]})") from None


def newest_usable_checkpoint(checkpoints_dir: Path, world: World,
                             engine: dict[str, Any]) -> tuple[Optional[Path], list[str]]:
    """The newest complete checkpoint that passes :func:`check_checkpoint`, and a message for each newer one
    skipped as damaged. None when there is no complete checkpoint; a ConfigError when none is usable."""
    skipped: list[str] = []
    for _, path in reversed(complete_checkpoints(checkpoints_dir)):
        try:
            check_checkpoint(path, world, engine)
            return path, skipped
        except DamagedCheckpoint as e:
            skipped.append(str(e).removeprefix("train.resume: "))
    if skipped:
        raise ConfigError(f"train.resume: no usable checkpoint in {checkpoints_dir}; the newest: {skipped[0]}")
    return None, skipped


def checkpoint_write_failed(directory: Path, error: OSError) -> Exception:
    """The one-line error for a save that could not be written: the partial ``.tmp`` is removed (it may hold the
    space a retry needs) and the message names the checkpoint that stays the latest."""
    from fastdag.errors import RunStopped, describe_os_error

    shutil.rmtree(directory.with_name(directory.name + TMP_SUFFIX), ignore_errors=True)
    latest = latest_checkpoint(directory.parent)
    keeps = f"{latest} stays the latest checkpoint" if latest else "no earlier checkpoint exists"
    return RunStopped(f"checkpoint {directory.name}: could not be written ({describe_os_error(error)}); {keeps}")
