"""Tiny models built from configs with random weights: no download, for smoke runs and tests.

``tiny-random`` has every component type of Stable Diffusion 1.5 (CLIP tokenizer and text encoder,
UNet2DConditionModel with cross-attention, AutoencoderKL, DDIM scheduler) at a size that runs on a laptop CPU;
``tiny-random-ddpm`` is the paper's toy kind: an unconditional pixel-space UNet2DModel in a DDPMPipeline;
``sd15-random`` is Stable Diffusion 1.5's architecture (UNet 860 M, VAE 84 M, CLIP ViT-L/14 text encoder 123 M
parameters) from its public config values with random weights: FLOP for FLOP the real model, for throughput
benchmarks on machines without the weights. All are built deterministically from a seed, so a preset name stands for fixed weights.
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


def word_level_clip_tokenizer(words: Iterable[str], model_max_length: int = 77, longest_first: bool = False):
    """A real ``CLIPTokenizer`` whose BPE merges spell each of ``words`` as one token.

    The vocabulary is CLIP's byte-level format: the 256 byte symbols, the same with ``</w>``, every prefix
    produced by the word merges, then ``<|startoftext|>`` and ``<|endoftext|>``. It saves as ordinary
    ``vocab.json``/``merges.txt`` files. Merges rank in alphabetical word order, or with ``longest_first`` the
    longer words' chains first (alphabetically, "a n" from "and" outranks "or a" and splits "orange").
    """
    from transformers import CLIPTokenizer

    byte_symbols = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in byte_symbols + [s + "</w>" for s in byte_symbols]:
        vocab.setdefault(s, len(vocab))
    merges: dict[tuple[str, str], None] = {}  # ordered set
    order = (lambda w: (-len(w), w)) if longest_first else None
    for word in sorted(set(w.lower() for w in words), key=order):
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


def sd15_ddim_scheduler():
    """SD 1.5's noise schedule (scaled-linear betas 0.00085–0.012 over 1000 steps, steps_offset 1,
    set_alpha_to_one False) as a ``DDIMScheduler``."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )


def sd_pipeline(vae, text_encoder, tokenizer, unet):
    """A ``StableDiffusionPipeline`` of these components on SD 1.5's DDIM schedule, without a safety checker (so
    ``save_pretrained`` and ``from_pretrained`` round-trip offline)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=sd15_ddim_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def small_clip_text_encoder(tokenizer, hidden_size: int, layers: int, heads: int, max_length: int):
    """A randomly initialised ``CLIPTextModel`` sized for ``tokenizer`` (draws from torch's global RNG)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer.get_vocab()), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=max_length,
        projection_dim=hidden_size, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))


def small_vae(block_out_channels: tuple[int, ...], image_size: int):
    """A randomly initialised ``AutoencoderKL`` with 4 latent channels, downsampling by 2^(blocks − 1)."""
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(block_out_channels), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=image_size,
    )


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
    from diffusers import UNet2DConditionModel

    tokenizer = word_level_clip_tokenizer(words, model_max_length=max_length)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = small_clip_text_encoder(tokenizer, text_dim, layers=2, heads=2, max_length=max_length)
        vae = small_vae((16, 32, 32), image_size)
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
    return sd_pipeline(vae, text_encoder, tokenizer, unet)


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


def sd15_configs(width_divisor: int = 1) -> dict[str, dict]:
    """The constructor arguments of SD 1.5's UNet, VAE and text encoder (runwayml/stable-diffusion-v1-5's
    ``unet/``, ``vae/``, ``text_encoder/`` config.json values). ``width_divisor`` (1, 2, 4, 8) divides every
    channel count, for tests; 1 is the real model."""
    d = width_divisor
    if d not in (1, 2, 4, 8):
        raise ValueError(f"width_divisor must be 1, 2, 4 or 8, got {d}")
    groups = 32 // d
    unet = dict(
        sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=tuple(c // d for c in (320, 640, 1280, 1280)), layers_per_block=2, downsample_padding=1,
        mid_block_scale_factor=1, act_fn="silu", norm_num_groups=groups, norm_eps=1e-5,
        cross_attention_dim=768 // d, attention_head_dim=8,
    )
    vae = dict(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=tuple(c // d for c in (128, 256, 512, 512)),
        layers_per_block=2, act_fn="silu", latent_channels=4, norm_num_groups=groups, sample_size=512,
        scaling_factor=0.18215,
    )
    text = dict(
        vocab_size=49408, hidden_size=768 // d, intermediate_size=3072 // d, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768 // d,
    )
    return {"unet": unet, "vae": vae, "text_encoder": text}


def sd15_parameter_counts(width_divisor: int = 1) -> dict[str, int]:
    """Parameters of each SD-1.5 component, counted on the meta device (no memory, no init)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = sd15_configs(width_divisor)
    with torch.device("meta"):
        modules = {
            "unet": UNet2DConditionModel(**cfg["unet"]),
            "vae": AutoencoderKL(**cfg["vae"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])),
        }
    return {k: sum(p.numel() for p in m.parameters()) for k, m in modules.items()}


def sd15_random_pipeline(seed: int = 0, width_divisor: int = 1, image_size: int = 512):
    """A ``StableDiffusionPipeline`` with SD 1.5's architecture and random weights drawn from ``seed``.

    The tokenizer is the word-level CLIP tokenizer of the tiny presets padded to 77 tokens (CLIP's context), so
    the text encoder sees SD's sequence length; its 49408-entry embedding is SD's. ``image_size`` 512 gives SD's
    4 × 64 × 64 latents. Built on the CPU in fp32 (~4.3 GB at full width); the model moves it to its device.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = sd15_configs(width_divisor)
    cfg["unet"]["sample_size"] = image_size // 8
    cfg["vae"]["sample_size"] = image_size
    tokenizer = word_level_clip_tokenizer(TINY_WORDS, model_max_length=77)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            **cfg["text_encoder"], bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ))
        vae = AutoencoderKL(**cfg["vae"])
        unet = UNet2DConditionModel(**cfg["unet"])
    return sd_pipeline(vae, text_encoder, tokenizer, unet)


PRESETS = {
    "tiny-random": tiny_text_to_image_pipeline,
    "tiny-random-ddpm": tiny_ddpm_pipeline,
    "sd15-random": sd15_random_pipeline,
}
