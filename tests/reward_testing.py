"""Tiny random checkpoints of each model reward, written in the layout its loader reads (HPSv2 as open_clip keys,
ImageReward as ImageReward.pt keys, by inverse maps written here), and the reward kwargs that load them."""
from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch

CLIP_TEXT = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "max_position_embeddings": 32, "hidden_act": "gelu"}
CLIP_VISION = {"hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
               "image_size": 16, "patch_size": 8, "hidden_act": "gelu"}


def clip_tokenizer(root: Path):
    """A byte-level BPE tokenizer of single letters (CLIP's format), saved in ``root/clip-tokenizer``."""
    from transformers import CLIPTokenizer

    tokens = ["<|startoftext|>", "<|endoftext|>", "!", *string.ascii_lowercase,
              *(c + "</w>" for c in string.ascii_lowercase)]
    tok = CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[])
    tok.save_pretrained(root / "clip-tokenizer")
    return tok, str(root / "clip-tokenizer")


def bert_tokenizer(root: Path):
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "an", "the", "cat", "dog", "red", "blue", "in",
             "field", "city", "bird", "fish", "green", "yellow"]
    d = root / "bert-tokenizer"
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.txt").write_text("\n".join(words) + "\n")
    return BertTokenizer.from_pretrained(d), str(d)


def clip_arch(tok) -> dict[str, Any]:
    text = {**CLIP_TEXT, "vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id}
    return {"projection_dim": 8, "text_config": text, "vision_config": dict(CLIP_VISION)}


def tiny_clip(tok):
    from transformers import CLIPConfig, CLIPModel

    a = clip_arch(tok)
    return CLIPModel(CLIPConfig(text_config=a["text_config"], vision_config=a["vision_config"],
                                projection_dim=a["projection_dim"])).eval()


def laion(root: Path) -> tuple[dict[str, Any], Any, Any]:
    """(kwargs, vision model, head): a tiny CLIPVisionModelWithProjection directory and an 8-wide head."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from fastdag.rewards.loading import MLPHead

    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VISION, projection_dim=8)).eval()
    model.save_pretrained(root / "laion-vision")
    head = MLPHead((8, 12, 10, 6, 4, 1)).eval()
    save_file(head.state_dict(), str(root / "head.safetensors"))
    return {"model": str(root / "laion-vision"), "head": str(root / "head.safetensors"), "device": "cpu"}, model, head


def pickscore(root: Path) -> tuple[dict[str, Any], Any, Any]:
    tok, tok_dir = clip_tokenizer(root)
    model = tiny_clip(tok)
    with torch.no_grad():
        model.logit_scale.fill_(2.5)
    model.save_pretrained(root / "pickscore")
    return {"model": str(root / "pickscore"), "tokenizer": tok_dir, "device": "cpu"}, model, tok


def transformers_to_openclip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of the HPSv2 converter, from transformers' CLIPModel keys to open_clip's."""
    out: dict[str, torch.Tensor] = {}
    block = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    fixed = {
        "vision_model.embeddings.class_embedding": "visual.class_embedding",
        "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
        "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "logit_scale": "logit_scale",
    }
    for k, v in state.items():
        if k.endswith("position_ids"):
            continue
        if k in fixed:
            out[fixed[k]] = v
        elif k == "visual_projection.weight":
            out["visual.proj"] = v.t().contiguous()
        elif k == "text_projection.weight":
            out["text_projection"] = v.t().contiguous()
        elif k.startswith("vision_model.pre_layrnorm."):
            out["visual.ln_pre." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("vision_model.post_layernorm."):
            out["visual.ln_post." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("text_model.final_layer_norm."):
            out["ln_final." + k.rsplit(".", 1)[1]] = v
        else:
            tower, _, _, i, rest = k.split(".", 4)
            prefix = ("visual." if tower == "vision_model" else "") + f"transformer.resblocks.{i}."
            module, param = rest.rsplit(".", 1)
            if module.startswith("self_attn.") and module != "self_attn.out_proj":
                continue  # q/k/v: packed below
            out[prefix + block[module] + "." + param] = v
            if module == "layer_norm1" and param == "weight":
                for p in ("weight", "bias"):
                    q, kk, vv = (state[f"{tower}.encoder.layers.{i}.self_attn.{n}.{p}"] for n in ("q_proj", "k_proj", "v_proj"))
                    out[prefix + f"attn.in_proj_{p}"] = torch.cat([q, kk, vv])
    n = state["text_model.embeddings.position_embedding.weight"].shape[0]
    out["attn_mask"] = torch.full((n, n), float("-inf")).triu(1)  # open_clip keeps its causal mask as a buffer
    return out


def hpsv2(root: Path) -> tuple[dict[str, Any], Any, Any]:
    """A tiny open_clip-layout ``HPS_v2_compressed.pt`` ({"state_dict": {"module." + key: ...}}, as published)."""
    tok, tok_dir = clip_tokenizer(root)
    model = tiny_clip(tok)
    d = root / "hpsv2"
    d.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"module." + k: v for k, v in transformers_to_openclip(model.state_dict()).items()}},
               d / "HPS_v2_compressed.pt")
    kwargs = {"model": str(d), "tokenizer": tok_dir, "device": "cpu", "arch": clip_arch(tok),
              "cache": str(root / "cache")}
    return kwargs, model, tok


IR_ARCH = {
    "vision": {"hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
               "image_size": 16, "patch_size": 8},
    "text": {"vocab_size": 19, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
             "num_attention_heads": 2, "max_position_embeddings": 40},
    "mlp": [12, 10, 6, 4, 1],
}


def transformers_to_imagereward(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of the ImageReward key map: our module's keys -> ``ImageReward.pt``'s."""
    vision = [("embeddings.class_embedding", "cls_token"), ("embeddings.position_embedding", "pos_embed"),
              ("embeddings.patch_embedding.", "patch_embed.proj."), ("post_layernorm.", "norm.")]
    layer = {"layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.qkv": "attn.qkv",
             "self_attn.projection": "attn.proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k.startswith("vision_model."):
            k = k[len("vision_model."):]
            if k.startswith("encoder.layers."):
                _, _, i, rest = k.split(".", 3)
                module, param = rest.rsplit(".", 1)
                out[f"blip.visual_encoder.blocks.{i}.{layer[module]}.{param}"] = v
            else:
                ours, theirs = next((a, b) for a, b in vision if k.startswith(a))
                out["blip.visual_encoder." + theirs + k[len(ours):]] = v
        elif k.startswith("text_encoder."):
            out["blip." + k] = v
        else:
            out[k] = v
    # unused by the reward, present in the real file
    out["blip.vision_proj.weight"] = torch.zeros(4, 24)
    out["blip.text_proj.weight"] = torch.zeros(4, 16)
    out["blip.text_encoder.embeddings.position_ids"] = torch.arange(40)[None]
    return out


def imagereward(root: Path) -> tuple[dict[str, Any], Any, Any]:
    from fastdag.rewards.imagereward import ImageRewardModel

    tok, tok_dir = bert_tokenizer(root)
    model = ImageRewardModel(IR_ARCH).eval()
    d = root / "imagereward"
    d.mkdir(parents=True, exist_ok=True)
    torch.save(transformers_to_imagereward(model.state_dict()), d / "ImageReward.pt")
    return {"model": str(d / "ImageReward.pt"), "tokenizer": tok_dir, "device": "cpu", "arch": IR_ARCH}, model, tok


TINY = {"laion_aesthetic": laion, "pickscore": pickscore, "hpsv2": hpsv2, "imagereward": imagereward}
