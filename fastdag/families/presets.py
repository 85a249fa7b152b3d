"""Models built from configs with random weights: no download, for smoke runs, tests and GPU throughput.

``tiny-random`` has every component type of Stable Diffusion 1.5 (CLIP tokenizer and text encoder,
UNet2DConditionModel with cross-attention, AutoencoderKL, DDIM scheduler) at a size that runs on a laptop CPU;
``tiny-random-ddpm`` is the paper's toy kind: an unconditional pixel-space UNet2DModel in a DDPMPipeline;
``tiny-random-sdxl``, ``tiny-random-sd3`` and ``tiny-random-flux`` are the same for SDXL, SD3 and FLUX (the component
types of each, at the sizes diffusers' own pipeline tests use, with a CLIP and a T5 tokenizer built in memory);
``sd15-random``, ``sd35-medium-random`` and ``flux-dev-random`` are the real architectures (SD 1.5; SD3.5 Medium;
FLUX.1-dev) from their public config values with random weights: FLOP for FLOP the real models, for throughput
benchmarks on machines without the weights (the large ones are initialised on the device, in bf16 on a GPU).
All are built deterministically from a seed, so a preset name stands for fixed weights.
"""
from __future__ import annotations

import contextlib
import string
from typing import Iterable, Optional

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


def word_level_t5_tokenizer(words: Iterable[str], model_max_length: int = 32):
    """A real ``T5TokenizerFast`` (SentencePiece-style Unigram) whose vocabulary holds each of ``words`` as one piece
    ("▁word"), then single characters: anything else still tokenizes. Pad 0, EOS 1, UNK 2, as T5's."""
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("▁" + w, -1.0) for w in sorted(set(w.lower() for w in words))]
    vocab += [("▁", -5.0)] + [(c, -10.0) for c in string.ascii_letters + string.digits + string.punctuation]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def _clip_with_projection(tokenizer, hidden_size: int, layers: int, heads: int, max_length: int, **extra):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=extra.pop("vocab_size", len(tokenizer.get_vocab())), hidden_size=hidden_size,
        intermediate_size=extra.pop("intermediate_size", 2 * hidden_size), num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=max_length, projection_dim=hidden_size,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **extra,
    ))


def _t5_encoder(vocab_size: int, d_model: int, d_ff: int, layers: int, heads: int, d_kv: int, **extra):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=d_model, d_ff=d_ff, d_kv=d_kv, num_layers=layers,
                                   num_heads=heads, **extra))


def flow_vae(block_out_channels: tuple[int, ...], latent_channels: int, image_size: int, scaling_factor: float,
             shift_factor: float):
    """An ``AutoencoderKL`` of the SD3/FLUX kind: ``shift_factor`` and ``scaling_factor``, no quant convs."""
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(block_out_channels),
        layers_per_block=1 if block_out_channels[0] < 64 else 2, latent_channels=latent_channels,
        norm_num_groups=8 if block_out_channels[0] < 64 else 32, sample_size=image_size,
        scaling_factor=scaling_factor, shift_factor=shift_factor, use_quant_conv=False, use_post_quant_conv=False,
    )


@contextlib.contextmanager
def _built_on(device: Optional[torch.device], seed: int):
    """Modules constructed inside are drawn from ``seed`` and created on ``device`` (CPU when None); on a CUDA device
    in bf16, so a 12 B-parameter model never passes through fp32 or the host."""
    on_gpu = device is not None and torch.device(device).type == "cuda"
    dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[torch.device(device)] if on_gpu else []):
        torch.manual_seed(seed)
        try:
            if on_gpu:
                torch.set_default_dtype(torch.bfloat16)
            with torch.device(device if on_gpu else "cpu"):
                yield
        finally:
            torch.set_default_dtype(dtype)


def tiny_sdxl_pipeline(seed: int = 0, image_size: int = 32, device: Optional[torch.device] = None):
    """A ``StableDiffusionXLPipeline`` at toy size (diffusers' SDXL pipeline-test configs): two CLIP text encoders
    (the second with projection), a ``text_time`` UNet, a 4-channel VAE; SDXL's noise schedule."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = word_level_clip_tokenizer(TINY_WORDS, model_max_length=16)
    with _built_on(None, seed):
        text_encoder = CLIPTextModel(_clip_with_projection(tokenizer, 32, 2, 2, 16).config)
        text_encoder_2 = _clip_with_projection(tokenizer, 32, 2, 2, 16)
        vae = small_vae((16, 32, 32), image_size)
        unet = UNet2DConditionModel(
            sample_size=image_size // 4, in_channels=4, out_channels=4, block_out_channels=(32, 64),
            layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
            projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64, norm_num_groups=8,
        )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    scheduler.register_to_config(clip_sample=False, set_alpha_to_one=False)  # as SDXL's published scheduler config
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)


def tiny_sd3_pipeline(seed: int = 0, image_size: int = 32, device: Optional[torch.device] = None):
    """A ``StableDiffusion3Pipeline`` at toy size: two CLIP text encoders with projection (16 wide each), a T5
    encoder (32 wide), an ``SD3Transformer2DModel`` (one joint block, patch 1), an SD3-style VAE (4 latent
    channels, shift and scale factors), a ``FlowMatchEulerDiscreteScheduler`` with SD3's shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer = word_level_clip_tokenizer(TINY_WORDS, model_max_length=16)
    t5_tokenizer = word_level_t5_tokenizer(TINY_WORDS, model_max_length=16)
    with _built_on(None, seed):
        text_encoder = _clip_with_projection(tokenizer, 16, 2, 2, 16)
        text_encoder_2 = _clip_with_projection(tokenizer, 16, 2, 2, 16)
        text_encoder_3 = _t5_encoder(len(t5_tokenizer), 32, 64, 1, 4, 8, relative_attention_num_buckets=8)
        vae = flow_vae((16, 32, 32), 4, image_size, scaling_factor=1.5305, shift_factor=0.0609)
        transformer = SD3Transformer2DModel(
            sample_size=image_size // 4, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
            num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=32,
            out_channels=4,
        )
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
        text_encoder_3=text_encoder_3, tokenizer_3=t5_tokenizer,
    )


def tiny_flux_pipeline(seed: int = 0, image_size: int = 32, device: Optional[torch.device] = None):
    """A ``FluxPipeline`` at toy size (diffusers' FLUX pipeline-test configs): CLIP (pooled) and T5 text encoders,
    a ``FluxTransformer2DModel`` with a guidance embedding (as FLUX.1-dev), a 4-channel VAE (16 channels packed),
    FLUX's dynamically shifted ``FlowMatchEulerDiscreteScheduler``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    tokenizer = word_level_clip_tokenizer(TINY_WORDS, model_max_length=16)
    t5_tokenizer = word_level_t5_tokenizer(TINY_WORDS, model_max_length=16)
    with _built_on(None, seed):
        text_encoder = CLIPTextModel(_clip_with_projection(tokenizer, 32, 2, 2, 16).config)
        text_encoder_2 = _t5_encoder(len(t5_tokenizer), 32, 64, 1, 4, 8, relative_attention_num_buckets=8)
        vae = flow_vae((16, 32, 32), 4, image_size, scaling_factor=0.3611, shift_factor=0.1159)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
            guidance_embeds=True,
        )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=t5_tokenizer)
    pipe.default_sample_size = image_size // 4  # its latent side (FLUX's 128 is for 1024 px); not saved by diffusers
    return pipe


CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", vocab_size=49408)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              hidden_act="gelu", vocab_size=49408)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_ff=10240, layers=24, heads=64, d_kv=64, feed_forward_proj="gated-gelu")


def _clip_from(tokenizer, spec: dict, projection: bool):
    from transformers import CLIPTextModel

    spec = dict(spec)
    hidden, layers, heads = spec.pop("hidden_size"), spec.pop("num_hidden_layers"), spec.pop("num_attention_heads")
    model = _clip_with_projection(tokenizer, hidden, layers, heads, 77, **spec)
    return model if projection else CLIPTextModel(model.config)


def sd35_medium_random_pipeline(seed: int = 0, image_size: int = 512, device: Optional[torch.device] = None):
    """Stable Diffusion 3.5 Medium's architecture with random weights (stabilityai/stable-diffusion-3.5-medium's
    config values: MMDiT-X, 24 layers × 24 heads × 64, dual attention in the first 13, patch 2, 16 latent channels;
    CLIP-L, CLIP-G and T5-XXL; shift 3). Flow-GRPO trains it at 512 px (``image_size``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer = word_level_clip_tokenizer(TINY_WORDS, model_max_length=77)
    t5_tokenizer = word_level_t5_tokenizer(TINY_WORDS, model_max_length=256)
    with _built_on(device, seed):
        text_encoder = _clip_from(tokenizer, CLIP_L, projection=True)
        text_encoder_2 = _clip_from(tokenizer, CLIP_G, projection=True)
        text_encoder_3 = _t5_encoder(**T5_XXL)
        vae = flow_vae((128, 256, 512, 512), 16, image_size, scaling_factor=1.5305, shift_factor=0.0609)
        transformer = SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
            out_channels=16, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
        )
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
        text_encoder_3=text_encoder_3, tokenizer_3=t5_tokenizer,
    )


def flux_dev_random_pipeline(seed: int = 0, image_size: int = 512, device: Optional[torch.device] = None):
    """FLUX.1-dev's architecture with random weights (black-forest-labs/FLUX.1-dev's config values: 19 double and
    38 single blocks, 24 heads × 128, guidance embedding, 16 latent channels packed 2×2; CLIP-L and T5-XXL;
    dynamic shifting). ``image_size`` 512 px as Flow-GRPO's FLUX runs."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tokenizer = word_level_clip_tokenizer(TINY_WORDS, model_max_length=77)
    t5_tokenizer = word_level_t5_tokenizer(TINY_WORDS, model_max_length=512)
    with _built_on(device, seed):
        text_encoder = _clip_from(tokenizer, CLIP_L, projection=False)
        text_encoder_2 = _t5_encoder(**T5_XXL)
        vae = flow_vae((128, 256, 512, 512), 16, image_size, scaling_factor=0.3611, shift_factor=0.1159)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=[16, 56, 56],
        )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=t5_tokenizer)
    pipe.default_sample_size = image_size // 8
    return pipe


PRESETS = {
    "tiny-random": lambda device=None: tiny_text_to_image_pipeline(),
    "tiny-random-ddpm": lambda device=None: tiny_ddpm_pipeline(),
    "tiny-random-sdxl": lambda device=None: tiny_sdxl_pipeline(),
    "tiny-random-sd3": lambda device=None: tiny_sd3_pipeline(),
    "tiny-random-flux": lambda device=None: tiny_flux_pipeline(),
    "sd15-random": lambda device=None: sd15_random_pipeline(),
    "sd35-medium-random": lambda device=None: sd35_medium_random_pipeline(device=device),
    "flux-dev-random": lambda device=None: flux_dev_random_pipeline(device=device),
}
