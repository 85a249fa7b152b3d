"""Tiny models built from configs with random weights: no download, for smoke runs and tests.

``tiny-random`` has every component type of Stable Diffusion 1.5 (CLIP tokenizer and text encoder,
UNet2DConditionModel with cross-attention, AutoencoderKL, DDIM scheduler) at a size that runs on a laptop CPU;
``tiny-random-ddpm`` is the paper's toy kind: an unconditional pixel-space UNet2DModel in a DDPMPipeline.
Both are built deterministically from a seed, so a preset name stands for fixed weights.
"""
from __future__ import annotations

from typing import Iterable

import torch

# Words of the built-in prompt sets; anything else still tokenizes, byte by byte.
TINY_WORDS = (
    "a an the of on in at with and photo painting picture drawing small large big tiny red green blue yellow "
    "orange purple pink black white gray brown cat dog horse bird fish cow sheep bear zebra lion tiger monkey "
    "circle square triangle star heart top bottom left right centre center background sky sea field forest "
    "city street house tree flower mountain river beach"
).split()


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable-unicode table used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def word_level_clip_tokenizer(words: Iterable[str], model_max_length: int = 77):
    """A real ``CLIPTokenizer`` whose BPE merges spell each of ``words`` as one token.

    The vocabulary is CLIP's byte-level format: the 256 byte symbols, the same with ``</w>``, every prefix
    produced by the word merges, then ``<|startoftext|>`` and ``<|endoftext|>``. It saves as ordinary
    ``vocab.json``/``merges.txt`` files.
    """
    from transformers import CLIPTokenizer

    byte_symbols = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in byte_symbols + [s + "</w>" for s in byte_symbols]:
        vocab.setdefault(s, len(vocab))
    merges: dict[tuple[str, str], None] = {}  # ordered set
    for word in sorted(set(w.lower() for w in words)):
        table = bytes_to_unicode()
        chars = [table[b] for b in word.encode("utf-8")]
        chars[-1] += "</w>"
        merged = chars[0]
        for c in chars[1:]:
            merges.setdefault((merged, c))
            merged += c
            vocab.setdefault(merged, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=model_max_length)


def tiny_text_to_image_pipeline(
    words: Iterable[str] = TINY_WORDS,
    seed: int = 0,
    image_size: int = 32,
    unet_channels: tuple[int, ...] = (32, 64),
    text_dim: int = 32,
    max_length: int = 16,
):
    """A ``StableDiffusionPipeline`` of SD-1.5 component types at toy size, weights drawn from ``seed``.

    Image ``image_size``² RGB; the VAE has 3 blocks (downsampling by 4), so latents are 4 × image_size/4 squared.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = word_level_clip_tokenizer(words, model_max_length=max_length)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer.get_vocab()),
                hidden_size=text_dim,
                intermediate_size=2 * text_dim,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=max_length,
                projection_dim=text_dim,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(16, 32, 32),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=image_size,
        )
        unet = UNet2DConditionModel(
            sample_size=image_size // 4,
            in_channels=4,
            out_channels=4,
            block_out_channels=unet_channels,
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D",) + ("DownBlock2D",) * (len(unet_channels) - 1),
            up_block_types=("UpBlock2D",) * (len(unet_channels) - 1) + ("CrossAttnUpBlock2D",),
            cross_attention_dim=text_dim,
            attention_head_dim=8,
            norm_num_groups=8,
        )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_ddpm_pipeline(seed: int = 0, image_size: int = 16):
    """A ``DDPMPipeline`` with a pixel-space ``UNet2DModel`` (one attention block, so LoRA has targets)."""
    from diffusers import DDIMScheduler, DDPMPipeline, UNet2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DModel(
            sample_size=image_size,
            in_channels=3,
            out_channels=3,
            block_out_channels=(16, 32),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=8,
            norm_num_groups=8,
        )
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
    return DDPMPipeline(unet=unet, scheduler=scheduler)


PRESETS = {
    "tiny-random": tiny_text_to_image_pipeline,
    "tiny-random-ddpm": tiny_ddpm_pipeline,
}
