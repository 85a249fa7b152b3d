"""ImageReward (Xu et al. 2023): BLIP's ViT-L/16 image encoder, its BERT-base text encoder cross-attending to
the image, and an MLP on the [CLS] output, normalised by the training statistics. Built from transformers'
``BlipVisionModel`` + ``BlipTextModel`` (the ``image-reward`` package does not import with transformers 5);
the ``ImageReward.pt`` keys map onto them exactly."""
from __future__ import annotations

import copy
import re
from typing import Any, Optional, Sequence

import torch
from torch import nn

from fastdag.rewards import register_reward
from fastdag.rewards.loading import (
    MLPHead, from_pretrained, load_exactly, load_state_dict, resolve_file, reward_device,
)
from fastdag.rewards.preprocess import clip_pixels

VISION: dict[str, Any] = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                          "num_attention_heads": 16, "image_size": 224, "patch_size": 16, "layer_norm_eps": 1e-6,
                          "hidden_act": "gelu"}
# is_decoder=True builds the cross-attention layers; the forward pass runs with is_decoder=False (no causal mask)
TEXT: dict[str, Any] = {"vocab_size": 30524, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                        "num_attention_heads": 12, "encoder_hidden_size": 1024, "max_position_embeddings": 512,
                        "layer_norm_eps": 1e-12, "hidden_act": "gelu", "is_decoder": True}
MLP_WIDTHS = (768, 1024, 128, 64, 16, 1)
MEAN, STD = 0.16717362830052426, 1.0333394966054072  # ImageReward's reward statistics
MAX_LENGTH = 35

_VISION_MAP = [  # (pattern, replacement) on keys of BLIP's ViT, after "blip.visual_encoder."
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
]


def imagereward_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``ImageReward.pt`` keys -> :class:`ImageRewardModel` keys: ``blip.`` dropped, BLIP's ViT names mapped to
    ``BlipVisionModel``'s; the text encoder's (BERT) names are already transformers'. ``vision_proj``,
    ``text_proj`` and ``position_ids`` are unused and dropped."""
    out: dict[str, torch.Tensor] = {}
    for key, v in state.items():
        key = key.removeprefix("blip.")
        if key.startswith("visual_encoder."):
            k = key[len("visual_encoder."):]
            for pattern, repl in _VISION_MAP:
                if re.match(pattern, k):
                    out["vision_model." + re.sub(pattern, repl, k)] = v
                    break
        elif key.startswith("text_encoder.") and not key.endswith("position_ids"):
            out[key] = v
        elif key.startswith("mlp."):
            out[key] = v
    return out


def _merged(base: dict[str, Any], over: Optional[dict[str, Any]]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    out.update(over or {})
    return out


class ImageRewardModel(nn.Module):
    """BLIP ViT + BERT with cross-attention + MLP; ``arch`` = {"vision": {...}, "text": {...}} overrides the
    configs (tests build tiny ones)."""

    def __init__(self, arch: Optional[dict[str, Any]] = None):
        super().__init__()
        from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        arch = arch or {}
        self.vision_model = BlipVisionModel(BlipVisionConfig(**_merged(VISION, arch.get("vision"))))
        # the text encoder cross-attends to the image tokens: its encoder width is the vision width
        text_cfg = _merged({**TEXT, "encoder_hidden_size": self.vision_model.config.hidden_size}, arch.get("text"))
        self.text_encoder = BlipTextModel(BlipTextConfig(**text_cfg), add_pooling_layer=False)
        h = self.text_encoder.config.hidden_size
        self.mlp = MLPHead((h, *arch.get("mlp", MLP_WIDTHS[1:])))

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, S, S], input_ids/attention_mask [B, L] -> rewards [B] (normalised)."""
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state  # [B, 1 + P, Dv]
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                                 encoder_attention_mask=image_atts, is_decoder=False).last_hidden_state
        return (self.mlp(text[:, 0, :]) - MEAN) / STD


@register_reward("imagereward")
class ImageReward:
    """ImageReward v1.0: BLIP ViT-L + BERT cross-attention + MLP, normalised (mean 0, std 1 on its data)."""

    def __init__(self, model: str = "THUDM/ImageReward", tokenizer: str = "bert-base-uncased", device: str = "auto",
                 arch: Optional[dict[str, Any]] = None):
        from transformers import BertTokenizer

        self.device = reward_device(device)
        src = resolve_file(model, "ImageReward.pt")
        self.model = ImageRewardModel(arch)
        load_exactly(self.model, imagereward_to_transformers(load_state_dict(src)), f"ImageReward checkpoint {src}")
        self.model.to(self.device, torch.float32).eval().requires_grad_(False)
        self.tokenizer = from_pretrained(BertTokenizer, tokenizer, "reward.kwargs.tokenizer")
        self.size = self.model.vision_model.config.image_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_LENGTH,
                             return_tensors="pt").to(self.device)
        pixels = clip_pixels(images, self.size, self.device)
        return self.model(pixels, tok.input_ids, tok.attention_mask).float().cpu()
