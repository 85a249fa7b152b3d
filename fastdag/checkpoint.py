"""Checkpoints: the LoRA in diffusers format, the flow network, and the training state.

A checkpoint is written to a temporary directory and renamed into place, so a crash mid-save never leaves a
half-written ``epoch-NNNN`` directory behind.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from fastdag.models import DiffusionModel

FLOW_WEIGHTS = "flow.safetensors"
TRAINER_STATE = "trainer_state.pt"


def save_checkpoint(
    directory: Path, model: DiffusionModel, flow: Optional[torch.nn.Module], state: dict[str, Any]
) -> Path:
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_lora(tmp)
    if flow is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in flow.state_dict().items()}, str(tmp / FLOW_WEIGHTS))
    torch.save(state, tmp / TRAINER_STATE)
    (tmp / "checkpoint.json").write_text(json.dumps({"epoch": state.get("epoch")}))
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
    return directory


def load_flow(directory: Path, flow: torch.nn.Module) -> None:
    flow.load_state_dict(load_file(str(directory / FLOW_WEIGHTS)))
