"""Checkpoint state that cannot run code when read: tensors in safetensors, everything else in JSON.

A pickle (``torch.save`` / ``torch.load(weights_only=False)``) runs whatever its ``__reduce__`` names, and users
share checkpoints. So a state (nested dicts, lists, tuples, numbers, strings, tensors, numpy arrays: RNG states,
optimizer state dicts, metrics) is written as ``NAME.json`` plus ``NAME.safetensors`` holding its tensors; the JSON
marks what plain JSON cannot say (a tensor's key, a tuple, a dict with non-string keys, a non-finite float, a
numpy array) with one-key objects such as ``{"__tensor__": "t3"}``. Reading builds only those types.

DeepSpeed's own checkpoint files are pickles by DeepSpeed's design; :func:`safe_torch_load` reads them with
``torch.load(weights_only=True)`` and an explicit allow-list of the few classes they hold.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fastdag.config import ConfigError

JSON_SUFFIX, TENSOR_SUFFIX = ".json", ".safetensors"
_MARKERS = ("__tensor__", "__tuple__", "__dict__", "__float__", "__ndarray__")


class StateFormatError(ValueError):
    """A state file that is not what :func:`save_state` writes (damaged, or not fastdag's)."""


def state_files(stem: Path) -> tuple[Path, Path]:
    return stem.with_name(stem.name + JSON_SUFFIX), stem.with_name(stem.name + TENSOR_SUFFIX)


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous().clone()  # clone: safetensors refuses shared storage
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": [str(obj.dtype), list(obj.shape), obj.reshape(-1).tolist()]}
    if isinstance(obj, np.generic):
        return _encode(obj.item(), tensors)
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"__dict__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint state")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1 and next(iter(obj)) in _MARKERS:
        (tag, value), = obj.items()
        if tag == "__tensor__":
            if value not in tensors:
                raise StateFormatError(f"tensor {value!r} missing")
            return tensors[value]
        if tag == "__tuple__":
            return tuple(_decode(v, tensors) for v in value)
        if tag == "__dict__":
            return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in value}
        if tag == "__float__":
            if value not in ("nan", "inf", "-inf"):
                raise StateFormatError(f"bad float {value!r}")
            return float(value)
        dtype, shape, flat = value
        if dtype not in ("uint32", "int64", "float64", "float32", "uint64", "int32"):  # what RNG states hold
            raise StateFormatError(f"numpy dtype {dtype!r} not allowed")
        return np.asarray(flat, dtype=dtype).reshape(shape)
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _hashable(key: Any) -> Any:
    if isinstance(key, list):
        return tuple(_hashable(k) for k in key)
    if isinstance(key, dict):
        raise StateFormatError("a mapping used as a key")
    return key


def save_state(stem: Path, state: Any) -> None:
    """Write ``state`` as ``stem.json`` (structure and scalars) and ``stem.safetensors`` (its tensors)."""
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(state, tensors)
    json_path, tensor_path = state_files(stem)
    save_file(tensors, str(tensor_path))
    json_path.write_text(json.dumps(encoded, allow_nan=False))


def load_tensors(path: Path, key: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a user's safetensors file (LoRA, flow or reward weights) on the CPU; a one-line ConfigError
    naming the file and what is wrong when it cannot be read or is not a whole safetensors file (truncated,
    empty, another format)."""
    where = f"{key}: " if key else ""
    try:
        return load_file(str(path))
    except OSError as e:
        raise ConfigError(f"{where}cannot read {path} ({e.strerror or e})") from None
    except Exception as e:  # noqa: BLE001 - safetensors' SafetensorError: a damaged header or data
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{where}{path} is damaged or not a safetensors file ({first})") from None


def load_state(stem: Path) -> Any:
    """Read what :func:`save_state` wrote; :class:`StateFormatError` (or OSError) when it is missing or damaged."""
    json_path, tensor_path = state_files(stem)
    try:
        encoded = json.loads(json_path.read_text(encoding="utf-8"), parse_constant=_no_constant)
        return _decode(encoded, load_file(str(tensor_path)))
    except (OSError, StateFormatError):
        raise
    except Exception as e:  # json's ValueError, safetensors' SafetensorError (a truncated file), a bad structure
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise StateFormatError(f"{type(e).__name__}: {first}") from None


def _no_constant(name: str) -> Any:
    raise StateFormatError(f"JSON constant {name} (fastdag writes non-finite floats as markers)")


def _deepspeed_safe_globals() -> list[Any]:
    """The classes DeepSpeed 0.19's ZeRO 0-2 checkpoints pickle besides tensors and containers (found by loading its
    files with ``weights_only=True`` and keeping each class torch named, no more): plain data holders whose
    unpickling sets attributes and calls nothing."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def safe_torch_load(path: str | Path, map_location: Any = None) -> Any:
    """``torch.load`` that unpickles only tensors, containers and the allow-listed DeepSpeed classes."""
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)
