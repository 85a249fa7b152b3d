"""Model families: config -> pipeline -> the family that knows its conditioning, sampler, x̂_0, p_B and LoRA.

The family comes from the pipeline's class (a preset's, or ``model_index.json``'s ``_class_name`` of a directory or
hub id), never from a flag: ``StableDiffusionPipeline`` -> sd, ``StableDiffusionXLPipeline`` -> sdxl,
``StableDiffusion3Pipeline`` -> sd3, ``FluxPipeline`` -> flux, ``DDPMPipeline`` -> ddpm. Adding a family is one
module implementing :class:`fastdag.families.base.ModelFamily` and a line in :data:`FAMILIES`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from fastdag.config import ConfigError, LoraConfig, ModelConfig
from fastdag.errors import without_trace_hints
from fastdag.families.base import Cond, ModelFamily, log_once
from fastdag.families.ddpm import DDPMFamily
from fastdag.families.flux import FluxFamily
from fastdag.families.presets import PRESETS
from fastdag.families.sd import SDFamily
from fastdag.families.sd3 import SD3Family
from fastdag.families.sdxl import SDXLFamily

FAMILIES: dict[str, type[ModelFamily]] = {f.pipeline_class: f for f in (SDFamily, SDXLFamily, SD3Family, FluxFamily,
                                                                        DDPMFamily)}

__all__ = ["Cond", "FAMILIES", "ModelFamily", "build_model", "family_for", "load_pipeline", "log_once",
           "resolve_device", "resolve_dtype"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device: {name!r} asked for, but CUDA is not available; use cpu or auto")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_pipeline(cfg: ModelConfig, device: Optional[torch.device] = None):
    """The pipeline named by ``model.pretrained``; a missing local path or an unreachable hub id is a ConfigError.
    Presets get ``device`` (the full-size random ones initialise their weights there)."""
    name = cfg.pretrained
    if name in PRESETS:
        return PRESETS[name](device=device)
    from fastdag import assets

    if name in assets.PIPELINES:
        path = assets.PIPELINES[name]()
        if not (path / "model_index.json").is_file():
            raise ConfigError(
                f"model.pretrained: the embedded model {name!r} is not in this install ({path}); "
                "build it with `fastdag toy pretrain --out DIR` and pass DIR"
            )
    else:
        path = Path(name).expanduser()
    looks_local = path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1
    if looks_local and not (path / "model_index.json").is_file():
        what = "is not a diffusers pipeline directory (no model_index.json)" if path.exists() else "no such directory"
        raise ConfigError(
            f"model.pretrained: {name!r} {what}; give a preset ({', '.join(PRESETS)}), a pipeline directory or a hub id"
        )
    if looks_local:
        _check_family(path / "model_index.json", name)
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.from_pretrained(str(path) if looks_local else name, revision=cfg.revision)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"model.pretrained: could not load {name!r}: {without_trace_hints(first)}") from None


def _check_family(index: Path, name: str) -> None:
    """A pipeline directory of a family fastdag knows, read from model_index.json before any weights load."""
    import json

    try:
        cls = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(f"model.pretrained: {index} is not readable JSON ({type(e).__name__})") from None
    if cls not in FAMILIES:
        raise ConfigError(f"model.pretrained: {name!r} is a {cls} (model_index.json); fastdag aligns "
                          f"{', '.join(FAMILIES)}")


def family_for(pipeline, device: torch.device, dtype: torch.dtype, resolution: Optional[int] = None) -> ModelFamily:
    """The family of a loaded pipeline, by its class (subclasses included)."""
    for cls in type(pipeline).__mro__:
        if cls.__name__ in FAMILIES:
            return FAMILIES[cls.__name__](pipeline, device, dtype, resolution)
    raise ConfigError(f"model.pretrained: {type(pipeline).__name__} is not supported; fastdag aligns "
                      f"{', '.join(FAMILIES)}")


def build_model(model_cfg: ModelConfig, lora_cfg: LoraConfig) -> tuple[ModelFamily, list[torch.nn.Parameter]]:
    device = resolve_device(model_cfg.device)
    dtype = resolve_dtype(model_cfg.dtype, device)
    model = family_for(load_pipeline(model_cfg, device), device, dtype, model_cfg.resolution)
    model.attention = model.set_attention(model_cfg.attention)
    if model_cfg.channels_last:
        model.apply_memory_format()
    params = model.add_lora(lora_cfg)
    if model_cfg.compile:
        model.denoiser.compile()  # in place: module names, LoRA state dicts and hooks stay as they are
    return model, params


def load_lora_into(model: ModelFamily, directory: Path) -> None:
    """Load a checkpoint's LoRA (what :meth:`ModelFamily.save_lora` wrote) into the model's peft adapter."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = directory / "pytorch_lora_weights.safetensors"
    if not path.is_file():
        raise ConfigError(f"{directory}: no LoRA weights (pytorch_lora_weights.safetensors)")
    state = model.lora_from_file(load_file(str(path)))
    result = set_peft_model_state_dict(model.denoiser, state, adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ConfigError(f"{path}: LoRA weights for another model or LoRA config (e.g. {unexpected[0]})")
