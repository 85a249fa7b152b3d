"""The LAION aesthetic predictor (the paper's aesthetic task): CLIP ViT-L/14 image embedding, L2-normalised,
through the ``sac+logos+ava1-l14-linearMSE`` head (shipped in fastdag/assets as safetensors). Scores ~1-10."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from fastdag.rewards import register_reward
from fastdag.rewards.loading import MLPHead, from_pretrained, load_state_dict, reward_device
from fastdag.rewards.preprocess import clip_pixels

HEAD = Path(__file__).resolve().parents[1] / "assets" / "laion_aesthetic_head.safetensors"


@register_reward("laion_aesthetic")
class LaionAesthetic:
    """LAION improved aesthetic predictor: CLIP ViT-L/14 image embedding -> sac+logos+ava1 linear head (~1-10)."""

    def __init__(self, model: str = "openai/clip-vit-large-patch14", head: Optional[str] = None,
                 device: str = "auto", revision: Optional[str] = None):
        from transformers import CLIPVisionModelWithProjection

        self.device = reward_device(device)
        self.model = from_pretrained(CLIPVisionModelWithProjection, model, "reward.kwargs.model",
                                     revision=revision, dtype=torch.float32).to(self.device).eval().requires_grad_(False)
        head_path = Path(head).expanduser() if head else HEAD
        self.head = MLPHead.from_state_dict(load_state_dict(head_path)).to(self.device).eval().requires_grad_(False)
        self.size = self.model.config.image_size

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """images float [B, 3, H, W] in [0, 1] -> unit-norm image embeddings [B, D] on the reward's device."""
        e = self.model(pixel_values=clip_pixels(images, self.size, self.device)).image_embeds
        return e / e.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.head(self.embed(images)).float().cpu()


def convert_head(src: str | Path, dst: str | Path = HEAD) -> Path:
    """The head's .pth (tensors saved on CUDA, loaded weights-only onto the CPU) -> safetensors at ``dst``."""
    from safetensors.torch import save_file

    state = load_state_dict(Path(src))
    MLPHead.from_state_dict(state)  # refuse anything that is not the head
    save_file({k: v.contiguous() for k, v in state.items()}, str(dst), metadata={"source": Path(src).name})
    return Path(dst)


if __name__ == "__main__":  # python -m fastdag.rewards.laion_aesthetic sac+logos+ava1-l14-linearMSE.pth
    import sys

    print(convert_head(sys.argv[1]))
