"""HPSv2 (Wu et al. 2023): an open_clip ViT-H/14 fine-tuned on human preferences, run as transformers'
``CLIPModel``. The open_clip checkpoint is converted at load time (key map below) and cached as safetensors.
Score = cosine(image, prompt) of the normalised embeddings (~0.2-0.3); HPSv2 applies no logit scale."""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from fastdag.config import ConfigError
from fastdag.rewards import register_reward
from fastdag.rewards.loading import (
    cache_dir, clip_cosine, from_pretrained, load_exactly, load_state_dict, resolve_file, reward_device,
)

# open_clip's ViT-H-14 (its model config), in transformers' CLIPConfig terms; gelu, not OpenAI's quick_gelu.
VIT_H_14: dict[str, Any] = {
    "projection_dim": 1024,
    "vision_config": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                      "num_attention_heads": 16, "image_size": 224, "patch_size": 14, "hidden_act": "gelu"},
    "text_config": {"vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                    "num_attention_heads": 16, "max_position_embeddings": 77, "hidden_act": "gelu",
                    "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 0},
}
FILES = {"2.0": "HPS_v2_compressed.pt", "2.1": "HPS_v2.1_compressed.pt"}

_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_TOP = {
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "logit_scale": "logit_scale",
}
_NORMS = {"visual.ln_pre.": "vision_model.pre_layrnorm.", "visual.ln_post.": "vision_model.post_layernorm.",
          "ln_final.": "text_model.final_layer_norm."}
_RESBLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")


def openclip_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open_clip ViT state dict (``module.`` stripped) -> transformers ``CLIPModel`` keys: ``in_proj_*`` split
    into q/k/v, ``c_fc``/``c_proj`` -> ``fc1``/``fc2``, ``ln_pre`` -> ``pre_layrnorm``, ``proj`` and
    ``text_projection`` ([in, out] matrices) transposed into Linear weights."""
    out: dict[str, torch.Tensor] = {}
    for key, v in state.items():
        if key in _TOP:
            out[_TOP[key]] = v
        elif key == "visual.proj":
            out["visual_projection.weight"] = v.t().contiguous()
        elif key == "text_projection":
            out["text_projection.weight"] = v.t().contiguous()
        elif key == "attn_mask" or key.endswith(".attn_mask"):
            continue  # the causal mask, rebuilt by transformers
        elif any(key.startswith(p) for p in _NORMS):
            p = next(p for p in _NORMS if key.startswith(p))
            out[_NORMS[p] + key[len(p):]] = v
        elif m := _RESBLOCK.match(key):
            tower = "vision_model" if m.group(1) else "text_model"
            base, rest = f"{tower}.encoder.layers.{m.group(2)}.", m.group(3)
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[1]
                for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                    out[f"{base}self_attn.{name}.{kind}"] = part.contiguous()
            else:
                module, param = rest.rsplit(".", 1)
                if module not in _BLOCK:
                    raise ConfigError(f"reward.kwargs.model: unexpected open_clip key {key!r}")
                out[f"{base}{_BLOCK[module]}.{param}"] = v
        else:
            raise ConfigError(f"reward.kwargs.model: unexpected open_clip key {key!r} (not an open_clip ViT checkpoint)")
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_clip(arch: Optional[dict[str, Any]] = None):
    """An untrained ``CLIPModel`` of open_clip's ViT-H-14, with ``arch`` overriding fields (tests: a tiny one)."""
    from transformers import CLIPConfig, CLIPModel

    cfg = _merge(VIT_H_14, arch or {})
    return CLIPModel(CLIPConfig(text_config=cfg["text_config"], vision_config=cfg["vision_config"],
                                projection_dim=cfg["projection_dim"]))


def converted_weights(src: Path, cache: Optional[str] = None) -> dict[str, torch.Tensor]:
    """The transformers-layout weights of the open_clip checkpoint ``src``, converted once and cached."""
    from safetensors.torch import load_file, save_file

    stat = src.stat()
    cached = cache_dir(cache) / f"hpsv2-{src.stem}-{stat.st_size}-{stat.st_mtime_ns}.safetensors"
    if cached.is_file():
        return load_file(str(cached))
    weights = openclip_to_transformers(load_state_dict(src))
    tmp = cached.with_name(cached.name + ".tmp")
    save_file(weights, str(tmp))
    tmp.replace(cached)  # a crash mid-write leaves no half file under the final name
    return weights


@register_reward("hpsv2")
class HPSv2:
    """HPSv2 preference score (version 2.0 or 2.1): open_clip ViT-H/14 via transformers, cosine(image, prompt)."""

    def __init__(self, version: str = "2.0", model: str = "xswu/HPSv2",
                 tokenizer: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", device: str = "auto",
                 arch: Optional[dict[str, Any]] = None, cache: Optional[str] = None):
        from transformers import AutoTokenizer

        version = str(version)
        if version not in FILES:
            raise ConfigError(f"reward.kwargs.version: HPSv2 versions are {', '.join(FILES)}, got {version!r}")
        self.device = reward_device(device)
        src = resolve_file(model, FILES[version])
        self.model = build_clip(arch)
        load_exactly(self.model, converted_weights(src, cache), f"HPSv2 checkpoint {src}")
        self.model.to(self.device, torch.float32).eval().requires_grad_(False)
        self.tokenizer = from_pretrained(AutoTokenizer, tokenizer, "reward.kwargs.tokenizer")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        # open_clip pads to 77 tokens and pools at the end token; the causal mask makes padding irrelevant
        return clip_cosine(self.model, self.tokenizer, images, list(prompts), self.device, padding="max_length")
