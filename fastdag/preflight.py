"""Checks of the user's input that can be made before a model loads: where the run writes, whether its directory
is free, which checkpoint a resume continues from (complete, readable, the same setup), whether the reward takes
the prompts. Each problem is a one-line ConfigError (exit status 2), found in seconds rather than after a model
load and a rollout."""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

from fastdag.checkpoint import check_checkpoint, engine_meta, newest_usable_checkpoint
from fastdag.config import Config, ConfigError, config_to_dict
from fastdag.distributed import World
from fastdag.outputs import LOCK_FILE, lock_run_dir, release_run_dir

log = logging.getLogger(__name__)
WRITE_PROBE = ".fastdag-write-check-"

# Config sections a resumed run must share with its checkpoint (the weights and optimizer state depend on them).
RESUME_MUST_MATCH = (("model", "pretrained"), ("lora",), ("dag", "algorithm"), ("dag", "flow"))


def planned_run_dir(cfg: Config) -> Optional[Path]:
    """The run directory of a named run (an unnamed one gets a fresh timestamped name when it starts)."""
    return Path(cfg.logging.output_dir).expanduser() / cfg.logging.run_name if cfg.logging.run_name else None


def check_writable(path: Path, key: str) -> None:
    """``path`` (a directory, possibly not yet created) can be created and written: its nearest existing ancestor
    is a directory in which a file can be made. A real write, not os.access: root passes every access check, and
    a read-only mount only shows on writing."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == path else f"lies under {existing}, which is a file"
        raise ConfigError(f"{key}: {path} {where}, not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=WRITE_PROBE, dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"{key}: cannot write in {existing} ({e.strerror or e})") from None


def check_run_dir(cfg: Config, run_dir: Optional[Path], world: World = World()) -> None:
    """The output directory is writable, a named run's directory is this run's alone (rank 0 locks it for the
    process group, see ``fastdag.outputs.lock_run_dir``; a second run is refused, naming the holder), and a named
    run never overwrites an earlier run: an existing, non-empty run directory is reused only to resume it.

    The lock is taken before the directory is looked at and held until the run ends, so two runs started
    together cannot both find it free and then both write into it."""
    check_writable(Path(cfg.logging.output_dir).expanduser(), "logging.output_dir")
    if run_dir is None:
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"logging.run_name: {run_dir} is a file, not a run directory")
    if run_dir.is_dir():
        check_writable(run_dir, "logging.run_name")
    if world.is_main:
        lock_run_dir(run_dir)
    try:
        if cfg.train.resume is None and holds_a_run(run_dir):
            raise ConfigError(f"logging.run_name: {run_dir} already holds a run; continue it with "
                              "train.resume=latest, or start a new run under another logging.run_name")
    except ConfigError:
        release_run_dir(run_dir)
        raise


def holds_a_run(run_dir: Path) -> bool:
    """Anything in ``run_dir`` but the lock and the write probes (another rank's ``check_writable``)."""
    return run_dir.is_dir() and any(p.name != LOCK_FILE and not p.name.startswith(WRITE_PROBE)
                                    for p in run_dir.iterdir())


def check_same_setup(saved: dict[str, Any], now: dict[str, Any], directory: Path) -> None:
    """The config fields the checkpoint's weights and optimizer state depend on are unchanged."""
    for path in RESUME_MUST_MATCH:
        a, b = _dig(saved, path), _dig(now, path)
        if a != b:
            raise ConfigError(f"train.resume: {directory} was trained with {'.'.join(path)}={a!r}, this config "
                              f"has {b!r}")


def _dig(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def choose_checkpoint(cfg: Config, run_dir: Optional[Path], world: World) -> Optional[Path]:
    """The checkpoint ``train.resume`` continues from, checked whole (see ``check_checkpoint``), or None for a
    fresh start. ``latest`` falls back past damaged newer checkpoints to the newest usable one, and says so."""
    resume = cfg.train.resume
    if resume is None:
        return None
    engine = engine_meta(cfg.engine.backend, cfg.engine.zero_stage)
    if resume == "latest":
        assert run_dir is not None  # Trainer._check_resume: latest needs a run name
        path, skipped = newest_usable_checkpoint(run_dir / "checkpoints", world, engine)
        for message in skipped:
            log.info("train.resume: skipping %s", message)
        if path is None:
            log.info("train.resume: no complete checkpoint in %s yet; starting from the beginning", run_dir)
            return None
        if skipped:
            log.info("train.resume: falling back to %s, the newest complete and readable checkpoint", path)
    else:
        path = Path(resume).expanduser()
    trainer_state, _ = check_checkpoint(path, world, engine)
    check_same_setup(trainer_state.get("config") if isinstance(trainer_state, dict) else None,
                     config_to_dict(cfg), path)
    return path


def check_reward_prompts(cfg: Config, reward: Any, prompts: list[str]) -> None:
    """The evaluation prompts and metric exist, and the reward takes the training and evaluation prompts, for
    rewards that can say (an optional ``check_prompts(prompts)`` raising ValueError, as the shapes world's has)."""
    sets = [("prompts.source", prompts)]
    if cfg.eval.prompts:
        from fastdag.config import PromptsConfig
        from fastdag.prompts import load_prompts

        try:
            held_out = load_prompts(PromptsConfig(source=cfg.eval.prompts, column=cfg.prompts.column))
            sets.append(("eval.prompts", held_out))
        except ConfigError as e:
            raise ConfigError(f"eval.prompts: {str(e).removeprefix('prompts.source: ')}") from None
    if cfg.eval.metric is not None:
        from fastdag.rewards import METRICS

        if cfg.eval.metric not in METRICS:
            raise ConfigError(f"eval.metric: unknown metric {cfg.eval.metric!r}; "
                              f"registered: {', '.join(sorted(METRICS))}")
    check = getattr(reward, "check_prompts", None)
    if check is None:
        return
    for key, names in sets:
        try:
            check(names)
        except ValueError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"{key}: reward {cfg.reward.name!r} does not take these prompts ({first})") from None


def quiet_loading() -> None:
    """``logging.progress=false`` also silences the libraries' own bars (loading pipeline components, shards)."""
    try:
        import diffusers.utils.logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        import transformers.utils.logging as transformers_logging

        transformers_logging.disable_progress_bar()
    except ImportError:
        pass
