"""Pretraining recipe of `shapes-flow-tiny`: the shapes world on Stable Diffusion 3's architecture, trained with
rectified flow, shipped in fastdag/assets/shapes-flow-tiny/.

Component types of SD3 (two ``CLIPTextModelWithProjection`` text encoders with the world's CLIP tokenizer, a small
``T5EncoderModel`` with a T5 tokenizer of the world's words, an ``SD3Transformer2DModel`` (MM-DiT), an
``AutoencoderKL`` with a shift and a scaling factor, a ``FlowMatchEulerDiscreteScheduler``), loadable with plain
``StableDiffusion3Pipeline.from_pretrained``:

1. the VAE is shapes-tiny's (32 × 32 RGB <-> 4 × 8 × 8), with SD3's latent convention z' = (z − shift) · scale, the
   shift and scale measured on world images (mean 0, std 1);
2. the CLIP text encoders start from shapes-tiny's (trained on the same captions; each gets its own projection), T5
   from random weights; all three learn
   with the transformer, jointly, the rectified-flow loss ‖v̂ − (ε − x₀)‖² at x_σ = (1−σ) x₀ + σ ε, σ drawn
   logit-normal (SD3's training density), on captions with attribute dropout 0.3 and 10% empty captions (for CFG),
   with an EMA of the weights (the shipped ones);
3. the pipeline is judged on held-out prompts (`fastdag.toy.base_figures`) with the trainer's sampler.

    fastdag toy pretrain --family sd3 --out DIR --threads 1     # seeded
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from fastdag.toy.pretrain import METRICS_NAME, SHIPPED_DIR, _cosine_schedule, _ema_update, _LossLog, _parameters, _version, latent_statistics
from fastdag.toy.world import ATTRIBUTE_DROPOUT, sample_batch

FLOW_SHIPPED_DIR = SHIPPED_DIR.parent / "shapes-flow-tiny"


@dataclass(frozen=True)
class FlowRecipe:
    """Every setting of the flow recipe; `recipe_metrics.json` records the one used."""

    steps: int = 8000
    """Transformer + text-encoder optimisation steps."""
    batch_size: int = 32
    lr: float = 2e-3
    """AdamW learning rate: linear warm-up, then cosine decay to 0."""
    warmup_steps: int = 100
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    caption_dropout: float = 0.1
    attribute_dropout: float = ATTRIBUTE_DROPOUT
    ema_decay: float = 0.995
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    """σ = sigmoid(N(mean, std)) at training (SD3's logit-normal density)."""
    shift: float = 1.0
    """The scheduler's fixed shift of the sampling sigmas (SD3 at 1024 px: 3; the world's 8 × 8 latents need none)."""
    layers: int = 4
    heads: int = 4
    head_dim: int = 24
    text_dim: int = 64
    """Width of each CLIP text encoder (shapes-tiny's); the joint text width (and T5's) is twice this."""
    t5_layers: int = 1
    t5_heads: int = 4
    scaling_images: int = 2048
    eval_steps: int = 20
    eval_guidance_scale: float = 5.0


def build_flow_pipeline(recipe: FlowRecipe = FlowRecipe(), seed: int = 0, base: Path = SHIPPED_DIR):
    """The untrained `shapes-flow-tiny` pipeline: SD3 component types; text encoders and VAE from ``base``
    (shapes-tiny), the transformer and the projections drawn from ``seed``."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from fastdag.families.presets import _t5_encoder, word_level_t5_tokenizer
    from fastdag.toy.world import world_vocabulary

    tokenizer = CLIPTokenizer.from_pretrained(str(base / "tokenizer"))
    t5_tokenizer = word_level_t5_tokenizer(world_vocabulary(), model_max_length=tokenizer.model_max_length)
    source = CLIPTextModel.from_pretrained(str(base / "text_encoder"))
    vae = AutoencoderKL.from_pretrained(str(base / "vae"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoders = []
        for _ in range(2):
            config = CLIPTextConfig(**{**source.config.to_dict(), "projection_dim": recipe.text_dim})
            encoder = CLIPTextModelWithProjection(config)
            encoder.text_model.load_state_dict(source.state_dict())  # only the projection is new
            encoders.append(encoder)
        t5 = _t5_encoder(len(t5_tokenizer), 2 * recipe.text_dim, 4 * recipe.text_dim, recipe.t5_layers,
                         recipe.t5_heads, 2 * recipe.text_dim // recipe.t5_heads, relative_attention_num_buckets=8)
        width = recipe.heads * recipe.head_dim
        transformer = SD3Transformer2DModel(
            sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=recipe.layers,
            attention_head_dim=recipe.head_dim, num_attention_heads=recipe.heads, caption_projection_dim=width,
            joint_attention_dim=2 * recipe.text_dim, pooled_projection_dim=2 * recipe.text_dim, pos_embed_max_size=8,
        )
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=recipe.shift), vae=vae,
        text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1], tokenizer_2=tokenizer,
        text_encoder_3=t5, tokenizer_3=t5_tokenizer,
    )


def train_flow(pipe, recipe: FlowRecipe, seed: int, progress: bool = True) -> dict:
    """Trains the transformer and both text encoders jointly with the rectified-flow loss; EMA weights at the end."""
    transformer, vae = pipe.transformer, pipe.vae
    encoders = [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]
    data_rng = np.random.default_rng(np.random.SeedSequence([seed, 3]))
    gen = torch.Generator().manual_seed(seed + 3)
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    params = [p for m in (transformer, *encoders) for p in m.parameters()]
    for m in (transformer, *encoders):
        m.requires_grad_(True).train()
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    schedule = _cosine_schedule(optimizer, recipe.warmup_steps, recipe.steps)
    length = pipe.tokenizer.model_max_length

    def encode(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The pipeline's own prompt encoding (both CLIPs side by side, then T5 along the sequence; pooled: both
        CLIP projections), with gradients: what sampling will see, by construction."""
        embeds, _, pooled, _ = pipe.encode_prompt(captions, None, None, device=torch.device("cpu"),
                                                  do_classifier_free_guidance=False, max_sequence_length=length)
        return embeds, pooled

    log = _LossLog(("loss",), recipe.steps)
    bar = tqdm(range(recipe.steps), desc="shapes-flow-tiny", disable=not progress)
    for step in bar:
        batch = sample_batch(data_rng, recipe.batch_size, attribute_dropout=recipe.attribute_dropout)
        with torch.no_grad():
            z = vae.encode(batch.images * 2 - 1).latent_dist.sample(generator=gen)
            x0 = (z - shift) * scale  # [B, 4, 8, 8]
        dropped = (torch.rand(len(batch.captions), generator=gen) < recipe.caption_dropout).tolist()
        captions = ["" if d else c for c, d in zip(batch.captions, dropped)]
        noise = torch.randn(x0.shape, generator=gen)
        sigma = torch.sigmoid(recipe.logit_normal_mean + recipe.logit_normal_std
                              * torch.randn(x0.shape[0], generator=gen))  # [B]
        s = sigma.view(-1, 1, 1, 1)
        x_sigma = (1 - s) * x0 + s * noise
        embeds, pooled = encode(captions)
        v = transformer(hidden_states=x_sigma, timestep=sigma * 1000, encoder_hidden_states=embeds,
                        pooled_projections=pooled).sample
        loss = (v - (noise - x0)).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        optimizer.step()
        schedule.step()
        _ema_update(ema, params, min(recipe.ema_decay, (1 + step) / (10 + step)))
        log.add(step, (loss.item(),))
        bar.set_postfix(loss=f"{loss.item():.4f}")
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    for m in (transformer, *encoders):
        m.requires_grad_(False).eval()
    return log.as_dict()


@torch.no_grad()
def flow_sampler_images(pipe, prompts: list[str], samples_per_prompt: int, num_steps: int, guidance_scale: float,
                        seed: int, noise_level: float = 0.7, batch_size: int = 64) -> tuple[torch.Tensor, list[str]]:
    """Samples with fastdag's own flow sampler (the trainer's: the SDE at ``noise_level``; 0 is the pipeline's Euler
    sampler), through the sd3 family. Returns images [P·k, 3, H, W] in [0, 1], prompt-major, and their prompts."""
    from fastdag.config import SampleConfig
    from fastdag.families import family_for
    from fastdag.rollout import generate_images

    model = family_for(pipe, torch.device("cpu"), torch.float32)
    sampler = model.make_sampler(num_steps, SampleConfig(noise_level=noise_level), backend="reference")
    repeated = [p for p in prompts for _ in range(samples_per_prompt)]
    generator = torch.Generator().manual_seed(seed)
    uncond = model.encode_negative("")
    images = [generate_images(model, sampler, repeated[i : i + batch_size], guidance_scale=guidance_scale,
                              uncond=uncond, generator=generator) for i in range(0, len(repeated), batch_size)]
    return torch.cat(images), repeated


def pretrain_flow(out_dir: str | Path, seed: int = 0, steps: int = FlowRecipe.steps, progress: bool = True,
                  threads: Optional[int] = None, judge_figures: bool = True, **settings) -> dict:
    """Runs the whole recipe, saves the pipeline (safetensors, fp32), METRICS_NAME and (``judge_figures``) the base
    figures by the judge (`fastdag.toy.base_figures`, ~1,000 samples: minutes)."""
    from fastdag.toy.base_figures import measure

    recipe = FlowRecipe(steps=steps, **settings)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if threads is not None:
        torch.set_num_threads(threads)
    load_before = os.getloadavg()
    start, cpu_start = time.perf_counter(), time.process_time()
    pipe = build_flow_pipeline(recipe, seed)
    pipe.set_progress_bar_config(disable=True)
    stats = latent_statistics(pipe.vae, seed, recipe.scaling_images)  # of z, before any shift
    pipe.vae.register_to_config(shift_factor=stats["mean"], scaling_factor=1.0 / stats["std"])
    losses = train_flow(pipe, recipe, seed, progress)
    train_seconds, train_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    pipe.save_pretrained(out_dir, safe_serialization=True)
    mark = time.perf_counter()
    figures = {"bars": None}
    if judge_figures:
        figures = measure(pipe, seed=seed, num_steps=recipe.eval_steps, guidance_scale=recipe.eval_guidance_scale,
                          sample_fn=flow_sampler_images)
        figures["settings"]["sampler"] = "fastdag FlowSampler, Flow-GRPO SDE, noise level 0.7 (the trainer's)"
        (out_dir / "base_figures.json").write_text(json.dumps(figures, indent=2) + "\n")
    metrics = {
        "recipe": asdict(recipe), "seed": seed,
        "parameters": {"transformer": _parameters(pipe.transformer), "text_encoder": _parameters(pipe.text_encoder),
                       "text_encoder_2": _parameters(pipe.text_encoder_2),
                       "text_encoder_3": _parameters(pipe.text_encoder_3), "vae": _parameters(pipe.vae)},
        "latents": stats, "losses": {"flow": losses},
        "seconds": {"train": round(train_seconds, 1), "evaluation": round(time.perf_counter() - mark, 1)},
        "cpu_seconds": {"train": round(train_cpu, 1)},
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "load_average_1_5_15min": {"start": [round(v, 2) for v in load_before],
                                   "end": [round(v, 2) for v in os.getloadavg()]},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "diffusers": _version("diffusers"), "transformers": _version("transformers")},
        "base_figures": figures["bars"],
    }
    (out_dir / METRICS_NAME).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
