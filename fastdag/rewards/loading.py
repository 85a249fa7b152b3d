"""What the model rewards share: devices, weight files from a hub id or a local path, pickles loaded safely,
and the MLP head of the LAION aesthetic predictor and ImageReward."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from fastdag.config import ConfigError


def reward_device(device: str) -> torch.device:
    """``auto``: this process's GPU if there is one (the trainer sets it per local rank first), else the CPU;
    otherwise a torch device string."""
    if device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"reward.kwargs.device: {device!r} is not a device ({e})") from None


def resolve_file(model: str, filename: str, key: str = "reward.kwargs.model", revision: Optional[str] = None) -> Path:
    """A weights file: ``model`` itself if it is a file, ``model/filename`` if it is a directory, else
    ``filename`` of the hub repository ``model`` (downloaded once into the hub cache)."""
    path = Path(model).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if not (path / filename).is_file():
            raise ConfigError(f"{key}: directory {model!r} has no {filename}")
        return path / filename
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(model, filename, revision=revision))
    except Exception as e:  # offline, unknown repo, missing file: one line either way
        raise ConfigError(f"{key}: {model!r} is neither a local file/directory nor a reachable hub repo with "
                          f"{filename} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def from_pretrained(cls: Any, name: str, key: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(name)`` with a missing model or tokenizer reported as one line."""
    try:
        return cls.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: cannot load {cls.__name__} from {name!r} "
                          f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or a torch pickle (``weights_only=True``: no code runs), on the CPU;
    a ``{"state_dict": ...}`` wrapper and DataParallel's ``module.`` prefix are removed."""
    if path.suffix == ".safetensors":
        from fastdag.state_io import load_tensors

        return load_tensors(path, "reward.kwargs.model")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated zip, a refused pickle global, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"reward.kwargs.model: cannot read {path} as a weights-only checkpoint ({first})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ConfigError(f"reward.kwargs.model: {path} holds a {type(obj).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def cache_dir(explicit: Optional[str] = None) -> Path:
    """Where converted weights are kept: ``explicit``, $FASTDAG_CACHE, or ~/.cache/fastdag."""
    d = Path(explicit or os.environ.get("FASTDAG_CACHE") or Path.home() / ".cache" / "fastdag").expanduser()
    d.mkdir(parents=True, exist_ok=True)
    return d


def load_exactly(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load ``state`` into ``module``; every parameter must be given (buffers such as position_ids may not)."""
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise ConfigError(f"reward.kwargs.model: {what} does not match the architecture "
                          f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}); "
                          "a smaller model needs reward.kwargs.arch")


class MLPHead(nn.Module):
    """``layers.{0,2,4,6,7}``: Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear (the LAION
    aesthetic head and ImageReward's MLP; no activations, so one affine map). Widths come from the weights."""

    def __init__(self, widths: tuple[int, ...] = (768, 1024, 128, 64, 16, 1)):
        super().__init__()
        w = widths
        self.layers = nn.Sequential(
            nn.Linear(w[0], w[1]), nn.Dropout(0.0), nn.Linear(w[1], w[2]), nn.Dropout(0.0),
            nn.Linear(w[2], w[3]), nn.Dropout(0.0), nn.Linear(w[3], w[4]), nn.Linear(w[4], w[5]),
        )

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], prefix: str = "") -> "MLPHead":
        try:
            widths = (state[f"{prefix}layers.0.weight"].shape[1],
                      *(state[f"{prefix}layers.{i}.weight"].shape[0] for i in (0, 2, 4, 6, 7)))
        except KeyError as e:
            raise ConfigError(f"reward.kwargs: the MLP head weights lack {e.args[0]}") from None
        head = cls(widths)
        load_exactly(head, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix + "layers.")},
                     "the MLP head")
        return head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, widths[0]] -> [B]."""
        return self.layers(x).squeeze(-1)


def pooled(out: Any) -> torch.Tensor:
    """transformers 5's ``get_image_features``/``get_text_features`` return an output object
    (the vector is ``pooler_output``); 4.x returned the tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def clip_cosine(model: Any, tokenizer: Any, images: torch.Tensor, prompts: list[str], device: torch.device,
                padding: str | bool = True) -> torch.Tensor:
    """Cosine of a CLIPModel's L2-normalised image and prompt embeddings, [B] fp32 on the CPU: PickScore (×
    logit_scale) and HPSv2 (padding "max_length": open_clip pads to 77 tokens) both score with it."""
    from fastdag.rewards.preprocess import clip_pixels

    size = model.config.vision_config.image_size
    img = pooled(model.get_image_features(pixel_values=clip_pixels(images, size, device)))
    tok = tokenizer(list(prompts), padding=padding, truncation=True,
                    max_length=model.config.text_config.max_position_embeddings, return_tensors="pt").to(device)
    txt = pooled(model.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask))
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    return (img * txt).sum(-1).float().cpu()
