"""Run tracking beside the run directory's own files: ``logging.tracker: none | tensorboard | wandb``.

The tracker receives what the run directory already holds (the resolved config, each epoch's metrics row, the
sample grids); ``metrics.jsonl`` stays the record. TensorBoard and wandb are optional (``pip install
fastdag[tracking]``); wandb runs offline when ``WANDB_MODE=offline`` (no network, no account).
"""
from __future__ import annotations

import numbers
import os
from pathlib import Path
from typing import Any, Protocol

import yaml

from fastdag.config import ConfigError


class Tracker(Protocol):
    def log_row(self, row: dict[str, Any], step: int) -> None:
        """One epoch's metrics row (its numbers), at step = the epoch."""

    def log_image(self, tag: str, path: Path, step: int) -> None:
        """A PNG the run wrote (a sample grid)."""

    def close(self) -> None: ...


class NoTracker:
    def log_row(self, row: dict[str, Any], step: int) -> None:
        pass

    def log_image(self, tag: str, path: Path, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def _numbers(row: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if isinstance(v, numbers.Real) and not isinstance(v, bool) and k != "epoch"}


class TensorBoardTracker:
    """Event files in ``<run_dir>/tensorboard`` (``tensorboard --logdir runs``)."""

    def __init__(self, run_dir: Path, config: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        text = yaml.safe_dump(config, sort_keys=False)
        self.writer.add_text("config", "    " + text.replace("\n", "\n    "))  # indented: Markdown code block
        self.writer.flush()

    def log_row(self, row: dict[str, Any], step: int) -> None:
        for k, v in _numbers(row).items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()  # a crashed run keeps its curves

    def log_image(self, tag: str, path: Path, step: int) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(path) as im:
            self.writer.add_image(tag, np.asarray(im.convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A wandb run named after the run directory, its files under it (offline: ``WANDB_MODE=offline``)."""

    def __init__(self, run_dir: Path, config: dict[str, Any]):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "fastdag"), name=run_dir.name,
                              dir=str(run_dir), config=config, resume="allow", id=run_dir.name)

    def log_row(self, row: dict[str, Any], step: int) -> None:
        self.run.log(_numbers(row), step=step)

    def log_image(self, tag: str, path: Path, step: int) -> None:
        self.run.log({tag: self.wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        self.run.finish()


TRACKERS = {"tensorboard": (TensorBoardTracker, "tensorboard"), "wandb": (WandbTracker, "wandb")}


def build_tracker(name: str, run_dir: Path, config: dict[str, Any]) -> Tracker:
    if name == "none":
        return NoTracker()
    if name not in TRACKERS:
        raise ConfigError(f"logging.tracker: must be one of none, {', '.join(TRACKERS)}, got {name!r}")
    cls, package = TRACKERS[name]
    try:
        return cls(run_dir, config)
    except ImportError:
        raise ConfigError(f"logging.tracker: {name} needs the {package} package: pip install 'fastdag[tracking]'") from None
