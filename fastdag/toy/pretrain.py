"""Pretraining recipe of `shapes-tiny`, the miniature text-to-image model shipped in fastdag/assets/shapes-tiny/.

The model has the component types of Stable Diffusion 1.5 (CLIPTokenizer, CLIPTextModel, UNet2DConditionModel
with cross-attention, AutoencoderKL, DDIMScheduler with SD's scaled-linear betas), at a size that trains on a
2-core CPU in well under 45 minutes, on the procedural shapes world (`fastdag.toy.world`):

1. the AutoencoderKL learns to reconstruct world images (MSE plus a small KL), 32 × 32 RGB <-> 4 × 8 × 8
   latents; the latent scaling factor is 1 / std of the latents, stored in the VAE config as SD does;
2. the UNet and the text encoder learn jointly to predict the noise ε of noised latents (the DDPM loss of Ho et
   al. 2020, Eq. 14), on captions whose attribute phrases (all but the kinds) are each dropped with probability
   0.3, so that partial prompts ("a red circle") are in distribution; captions dropped to "" 10% of the time so
   that classifier-free guidance works; with an EMA of both (the EMA weights are the ones shipped);
3. the pipeline is evaluated on the held-out prompts, never seen in training, with the shapes classifier
   (`evaluate_pipeline`), and saved with `recipe_metrics.json` beside it.

The base model is meant to be good but not perfect: the alignment job must have room to improve it.

    fastdag toy pretrain --out DIR            # or: python -m fastdag.toy.pretrain --out DIR

The defaults reproduce the shipped model (attribute dropout 0.3, 8,000 UNet steps: 1,693 s wall, 1,680 s CPU at
1 thread; up to thread-count-dependent float rounding); `--attribute-dropout 0 --unet-steps 3000` gives the
earlier full-caption model. Its base figures by the judge are in `base_figures.json` beside it
(`python -m fastdag.toy.base_figures`). The sample grid
docs/results/2026-12-01-shapes-tiny-base/shipped_samples.png is drawn by `write_sample_grid` from the shipped
pipeline.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fastdag.families.presets import sd_pipeline, small_clip_text_encoder, small_vae, word_level_clip_tokenizer
from fastdag.toy.reward import ShapesAlignmentReward
from fastdag.toy.world import ATTRIBUTE_DROPOUT, parse_caption, sample_batch, shapes_prompts, world_vocabulary

METRICS_NAME = "recipe_metrics.json"
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "assets" / "shapes-tiny"
LOSS_WEIGHTINGS = ("epsilon", "min_snr", "v")


@dataclass(frozen=True)
class Recipe:
    """Every setting of the pretraining recipe; `recipe_metrics.json` records the one used."""

    vae_steps: int = 1500
    """AutoencoderKL optimisation steps."""
    unet_steps: int = 8000
    """UNet + text-encoder optimisation steps."""
    batch_size: int = 32
    """Images per UNet step (fresh world images every step, held-out scenes excluded)."""
    vae_batch_size: int = 32
    """Images per VAE step."""
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-5
    """Weight of the per-element KL(q(z|x) ‖ N(0, I)) against the per-pixel MSE (images in [-1, 1])."""
    unet_lr: float = 1e-3
    """AdamW learning rate of the UNet and the text encoder: linear warm-up, then cosine decay to 0."""
    warmup_steps: int = 100
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    loss_weighting: str = "epsilon"
    """Per-sample weight w(t) of the ε-prediction loss, SNR_t = ᾱ_t / (1 − ᾱ_t): "epsilon" 1 (the DDPM loss),
    "min_snr" min(SNR_t, snr_gamma) / SNR_t (Hang et al. 2023), "v" (1 + SNR_t) / SNR_t, which equals the
    v-prediction loss (Salimans & Ho 2022) and stresses the high-noise steps where the layout is decided;
    divided by its mean over t so that the loss keeps the DDPM loss's scale."""
    snr_gamma: float = 5.0
    caption_dropout: float = 0.1
    """Fraction of captions replaced by "" (the unconditional prompt of classifier-free guidance)."""
    attribute_dropout: float = ATTRIBUTE_DROPOUT
    """Probability that each attribute phrase but the kind is left out of a UNet-step caption, independently
    (`fastdag.toy.world.drop_attributes`; why this value: `ATTRIBUTE_DROPOUT`). 0 trains on full captions only."""
    train_text_encoder: bool = True
    """Train the text encoder with the UNet; False keeps its random initial weights."""
    ema_decay: float = 0.995
    """EMA of the UNet and text-encoder weights; the decay warms up as min(decay, (1 + n) / (10 + n))."""
    scaling_images: int = 2048
    """Images whose latents give the scaling factor."""
    latent_std: float = 1.0
    """Std of the scaled latents: scaling_factor = latent_std / std(latents); SD's convention is 1."""
    vae_channels: tuple[int, ...] = (16, 32, 32)
    unet_channels: tuple[int, ...] = (32, 64)
    unet_attention_levels: int = 2
    """How many UNet levels, from the top (8 × 8), have cross-attention blocks."""
    attention_head_dim: int = 16
    text_dim: int = 64
    text_layers: int = 2
    max_length: int = 24
    """Tokenizer length: the longest world caption is 21 words, 23 tokens with <|startoftext|> and <|endoftext|>."""
    eval_prompts: int = 64
    """How many held-out prompts (from the first) the final evaluation samples; 64 is all of them."""
    eval_samples_per_prompt: int = 4
    eval_steps: int = 20
    eval_guidance_scale: float = 5.0

    def __post_init__(self) -> None:
        if min(self.vae_steps, self.unet_steps, self.batch_size, self.vae_batch_size) < 1:
            raise ValueError(
                f"vae_steps, unet_steps, batch_size and vae_batch_size must be ≥ 1, got {self.vae_steps}, "
                f"{self.unet_steps}, {self.batch_size}, {self.vae_batch_size}"
            )
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {self.loss_weighting!r}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if not 0.0 <= self.attribute_dropout < 1.0:
            raise ValueError(f"attribute_dropout must be in [0, 1), got {self.attribute_dropout}")
        if not 1 <= self.unet_attention_levels <= len(self.unet_channels):
            raise ValueError(f"unet_attention_levels must be in [1, {len(self.unet_channels)}]")
        if any(c % self.attention_head_dim for c in self.unet_channels[: self.unet_attention_levels]):
            raise ValueError(f"attention_head_dim {self.attention_head_dim} must divide the attention channels")


def world_tokenizer(max_length: int = 24):
    """A real ``CLIPTokenizer`` (byte-level BPE, CLIP's vocabulary format) that spells each world word as one token.

    `fastdag.families.presets.word_level_clip_tokenizer` with the merge chains of longer words first: in
    alphabetical order the merge "a n" (from "and") outranks "or a", so "orange" and "triangle" come apart into
    four or six pieces. Raises RuntimeError if some word still is not one token.
    """
    words = world_vocabulary()
    tokenizer = word_level_clip_tokenizer(words, model_max_length=max_length, longest_first=True)
    split = [w for w in words if len(tokenizer.tokenize(w)) != 1]
    if split:
        raise RuntimeError(f"world words not spelled as one token: {split}")
    return tokenizer


def build_pipeline(recipe: Recipe = Recipe(), seed: int = 0):
    """The untrained `shapes-tiny` pipeline: SD-1.5 component types, weights drawn from `seed`.

    32 × 32 RGB images; the VAE has 3 blocks (downsampling by 4), so latents are 4 × 8 × 8.
    """
    from diffusers import UNet2DConditionModel

    tokenizer = world_tokenizer(recipe.max_length)
    levels = len(recipe.unet_channels)
    attention = [i < recipe.unet_attention_levels for i in range(levels)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = small_clip_text_encoder(tokenizer, recipe.text_dim, layers=recipe.text_layers,
                                               heads=max(1, recipe.text_dim // 16), max_length=recipe.max_length)
        vae = small_vae(recipe.vae_channels, 32)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=recipe.unet_channels,
            layers_per_block=1,
            down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
            up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
            cross_attention_dim=recipe.text_dim,
            # diffusers reads attention_head_dim as the number of heads (SD 1.5's naming quirk).
            attention_head_dim=tuple(max(1, c // recipe.attention_head_dim) for c in recipe.unet_channels),
            norm_num_groups=8,
        )
    return sd_pipeline(vae, text_encoder, tokenizer, unet)


def _cosine_schedule(optimizer: torch.optim.Optimizer, warmup: int, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)),
    )


class _LossLog:
    """Means of named losses over consecutive windows of steps: [[last step, mean, ...], ...] (≤ ~50 rows)."""

    def __init__(self, names: Sequence[str], steps: int, rows: int = 50) -> None:
        self.names, self.window = tuple(names), max(1, steps // rows)
        self.rows: list[list[float]] = []
        self._sums = [0.0] * len(self.names)
        self._count = 0

    def add(self, step: int, values: Sequence[float]) -> None:
        self._sums = [s + v for s, v in zip(self._sums, values)]
        self._count += 1
        if self._count == self.window:
            self.rows.append([step + 1] + [round(s / self._count, 6) for s in self._sums])
            self._sums, self._count = [0.0] * len(self.names), 0

    def as_dict(self) -> dict:
        return {"columns": ["step", *self.names], "rows": self.rows}


def train_vae(vae, recipe: Recipe, seed: int, progress: bool = True) -> dict:
    """Trains `vae` in place: per-pixel MSE of the reconstruction of a posterior sample, plus a KL term.

    Returns the loss log (`_LossLog.as_dict`) and the final reconstruction MSE.
    """
    data_rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    gen = torch.Generator().manual_seed(seed + 1)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=recipe.weight_decay)
    schedule = _cosine_schedule(optimizer, recipe.warmup_steps, recipe.vae_steps)
    log = _LossLog(("mse", "kl"), recipe.vae_steps)
    vae.train()
    bar = tqdm(range(recipe.vae_steps), desc="shapes-tiny VAE", disable=not progress)
    for step in bar:
        x = sample_batch(data_rng, recipe.vae_batch_size).images * 2 - 1  # [B, 3, 32, 32] in [-1, 1]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        mse = F.mse_loss(recon, x)
        kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
        loss = mse + recipe.vae_kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), recipe.grad_clip)
        optimizer.step()
        schedule.step()
        log.add(step, (mse.item(), kl.item()))
        bar.set_postfix(mse=f"{mse.item():.5f}", kl=f"{kl.item():.2f}")
    vae.eval()
    return log.as_dict()


@torch.no_grad()
def latent_statistics(vae, seed: int, n_images: int, target_std: float = 1.0, batch_size: int = 256) -> dict[str, float]:
    """Mean and std of posterior samples of `n_images` world images; scaling_factor = target_std / std."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2]))
    gen = torch.Generator().manual_seed(seed + 2)
    latents = []
    for start in range(0, n_images, batch_size):
        x = sample_batch(rng, min(batch_size, n_images - start)).images * 2 - 1
        latents.append(vae.encode(x).latent_dist.sample(generator=gen))
    z = torch.cat(latents)  # [N, 4, 8, 8]
    std = z.std().item()
    return {"mean": z.mean().item(), "std": std, "scaling_factor": target_std / std}


def loss_weights(alphas_cumprod: torch.Tensor, weighting: str, snr_gamma: float = 5.0) -> torch.Tensor:
    """w(t) of `Recipe.loss_weighting` for every training timestep, mean 1. alphas_cumprod [T] -> [T]."""
    snr = alphas_cumprod / (1 - alphas_cumprod)
    if weighting == "epsilon":
        w = torch.ones_like(snr)
    elif weighting == "min_snr":
        w = snr.clamp(max=snr_gamma) / snr
    elif weighting == "v":
        w = (1 + snr) / snr
    else:
        raise ValueError(f"loss weighting must be one of {LOSS_WEIGHTINGS}, got {weighting!r}")
    return w / w.mean()


@torch.no_grad()
def _ema_update(ema: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    torch._foreach_lerp_(ema, params, 1.0 - decay)


def train_denoiser(pipe, recipe: Recipe, seed: int, progress: bool = True) -> dict:
    """Trains the UNet and the text encoder jointly with the ε-prediction loss on VAE latents.

    Loss: E_{x0, c, t, ε} ‖ε − ε_θ(√ᾱ_t z0 + √(1−ᾱ_t) ε, t, τ(c))‖², z0 = scaling_factor · (posterior sample of
    x0), t uniform on the scheduler's 1000 training steps, c a caption with attribute phrases dropped
    (`Recipe.attribute_dropout`), replaced by "" with probability caption_dropout.
    At the end the EMA weights are copied into the models. Returns the loss log.
    """
    unet, text_encoder, vae, tokenizer = pipe.unet, pipe.text_encoder, pipe.vae, pipe.tokenizer
    data_rng = np.random.default_rng(np.random.SeedSequence([seed, 3]))
    gen = torch.Generator().manual_seed(seed + 3)
    alphas_cumprod = pipe.scheduler.alphas_cumprod.float()  # [1000]
    n_train_steps = alphas_cumprod.shape[0]
    scale = vae.config.scaling_factor
    weights = loss_weights(alphas_cumprod, recipe.loss_weighting, recipe.snr_gamma)  # [1000]
    trained = (unet, text_encoder) if recipe.train_text_encoder else (unet,)
    text_encoder.requires_grad_(recipe.train_text_encoder)
    params = [p for m in trained for p in m.parameters()]
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=recipe.unet_lr, weight_decay=recipe.weight_decay)
    schedule = _cosine_schedule(optimizer, recipe.warmup_steps, recipe.unet_steps)
    token_cache: dict[str, torch.Tensor] = {}

    def token_ids(captions: list[str]) -> torch.Tensor:
        missing = [c for c in set(captions) if c not in token_cache]
        if missing:
            ids = tokenizer(missing, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
            token_cache.update(zip(missing, ids))
        return torch.stack([token_cache[c] for c in captions])  # [B, L]

    log = _LossLog(("loss",), recipe.unet_steps)
    unet.train()
    text_encoder.train()
    bar = tqdm(range(recipe.unet_steps), desc="shapes-tiny UNet", disable=not progress)
    for step in bar:
        batch = sample_batch(data_rng, recipe.batch_size, attribute_dropout=recipe.attribute_dropout)
        with torch.no_grad():
            z0 = vae.encode(batch.images * 2 - 1).latent_dist.sample(generator=gen) * scale  # [B, 4, 8, 8]
        dropped = (torch.rand(len(batch.captions), generator=gen) < recipe.caption_dropout).tolist()
        captions = ["" if d else c for c, d in zip(batch.captions, dropped)]
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, n_train_steps, (z0.shape[0],), generator=gen)  # [B]
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        context = text_encoder(token_ids(captions))[0]  # [B, L, D]
        error = (unet(zt, t, encoder_hidden_states=context).sample - noise).square().mean((1, 2, 3))  # [B]
        loss = (weights[t] * error).mean()
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
    unet.eval()
    text_encoder.eval()
    return log.as_dict()


@torch.no_grad()
def sample_pipeline(
    pipe,
    prompts: Sequence[str],
    samples_per_prompt: int = 4,
    num_steps: int = 20,
    guidance_scale: float = 5.0,
    seed: int = 0,
    eta: float = 0.0,
    batch_size: int = 64,
) -> tuple[torch.Tensor, list[str]]:
    """Samples `samples_per_prompt` images per prompt with the pipeline's own call (see `evaluate_pipeline`).

    Returns images float [P · samples_per_prompt, 3, H, W] in [0, 1], prompt-major, and the prompt of each.
    """
    generator = torch.Generator().manual_seed(seed)
    per_call = max(1, batch_size // samples_per_prompt)
    images = []
    for start in range(0, len(prompts), per_call):
        chunk = list(prompts[start : start + per_call])
        out = pipe(
            chunk,
            num_inference_steps=num_steps,
            guidance_scale=guidance_scale,
            num_images_per_prompt=samples_per_prompt,
            eta=eta,
            generator=generator,
            output_type="pt",
        )
        images.append(out.images.float().cpu())
    return torch.cat(images), [p for p in prompts for _ in range(samples_per_prompt)]


@torch.no_grad()
def evaluate_pipeline(
    pipe,
    prompts: Sequence[str],
    samples_per_prompt: int = 4,
    num_steps: int = 20,
    guidance_scale: float = 5.0,
    seed: int = 0,
    eta: float = 0.0,
    batch_size: int = 64,
    reward: Optional[ShapesAlignmentReward] = None,
) -> dict:
    """Samples `samples_per_prompt` images per prompt and scores them with the shapes classifier.

    Sampling is the pipeline's own call, ``pipe(prompts, num_inference_steps=num_steps,
    guidance_scale=guidance_scale, eta=eta, generator=torch.Generator().manual_seed(seed), output_type="pt")``,
    in chunks of about `batch_size` images that share one generator (so the result depends on `batch_size`);
    eta 0 is diffusers' default (deterministic DDIM), eta 1 the alignment trainer's sampler.

    Returns a dict: ``accuracy`` (mean of each `shapes_attribute_accuracy` key over all images, plus
    ``reward``: the mean `ShapesAlignmentReward`), ``accuracy_by_shapes`` (the same for one- and two-shape
    prompts), ``images`` float [P · samples_per_prompt, 3, H, W] in [0, 1] (prompt-major: the samples of
    prompt 0, then of prompt 1, ...), ``prompts`` (the prompt of each image), and the sampling settings.
    """
    reward = reward or ShapesAlignmentReward()
    images_t, repeated = sample_pipeline(pipe, prompts, samples_per_prompt, num_steps, guidance_scale, seed, eta,
                                         batch_size)
    scores = reward.attribute_accuracy(images_t, repeated)
    scores["reward"] = reward(images_t, repeated)
    n_shapes = torch.tensor([len(parse_caption(p).shapes) for p in repeated])

    def means(mask: torch.Tensor) -> dict[str, float]:
        return {k: round(v[mask].mean().item(), 4) for k, v in scores.items()} if mask.any() else {}

    return {
        "accuracy": means(torch.ones_like(n_shapes, dtype=torch.bool)),
        "accuracy_by_shapes": {"1": means(n_shapes == 1), "2": means(n_shapes == 2)},
        "images": images_t,
        "prompts": repeated,
        "settings": {
            "prompts": len(prompts),
            "samples_per_prompt": samples_per_prompt,
            "num_steps": num_steps,
            "guidance_scale": guidance_scale,
            "eta": eta,
            "seed": seed,
            "batch_size": batch_size,
            "sampler": "StableDiffusionPipeline.__call__ (DDIMScheduler)",
        },
    }


def sample_grid(images: torch.Tensor, prompts: Sequence[str], samples_per_prompt: int, scale: int = 4,
                text_width: int = 360):
    """A PIL image: one row per prompt, its samples side by side (upscaled `scale`×, nearest) and the caption
    wrapped to the right. images float [P · samples_per_prompt, 3, H, W] in [0, 1], prompt-major."""
    from PIL import Image, ImageDraw

    n_rows = len(images) // samples_per_prompt
    h, w = images.shape[-2] * scale, images.shape[-1] * scale
    pad = 4
    grid = Image.new("RGB", (samples_per_prompt * (w + pad) + text_width, n_rows * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for row in range(n_rows):
        y = pad + row * (h + pad)
        for col in range(samples_per_prompt):
            tile = Image.fromarray(pixels[row * samples_per_prompt + col]).resize((w, h), Image.Resampling.NEAREST)
            grid.paste(tile, (pad + col * (w + pad), y))
        text = "\n".join(textwrap.wrap(prompts[row * samples_per_prompt], width=text_width // 7))
        draw.multiline_text((samples_per_prompt * (w + pad) + 2 * pad, y + 4), text, fill="black", spacing=4)
    return grid


def write_sample_grid(pipe, path: str | Path, n_prompts: int = 8, samples_per_prompt: int = 4, seed: int = 0,
                      eta: float = 0.0) -> dict:
    """Samples the first `n_prompts` held-out prompts (20 DDIM steps, CFG 5) and saves the grid PNG at `path`.

    Returns the `evaluate_pipeline` result of those prompts.
    """
    result = evaluate_pipeline(pipe, shapes_prompts("heldout")[:n_prompts], samples_per_prompt, seed=seed, eta=eta)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sample_grid(result["images"], result["prompts"], samples_per_prompt).save(path)
    return result


def _parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def pretrain(
    out_dir: str | Path,
    seed: int = 0,
    vae_steps: int = Recipe.vae_steps,
    unet_steps: int = Recipe.unet_steps,
    batch_size: int = Recipe.batch_size,
    progress: bool = True,
    threads: Optional[int] = None,
    **settings,
) -> dict:
    """Runs the whole recipe and saves the pipeline (safetensors, fp32) and METRICS_NAME in `out_dir`.

    Seeded: initial weights, training images, noise, timesteps and caption dropout all derive from `seed`.
    threads: torch CPU threads for the run (default: leave torch's setting). settings: other `Recipe` fields
    (e.g. ``unet_lr=5e-4``); an unknown name raises TypeError.

    Returns the metrics written to METRICS_NAME: the recipe, parameter counts, latent statistics, loss logs,
    wall and CPU seconds per phase, threads, load averages, and the held-out evaluation (`evaluate_pipeline`
    without images) at eta 0 and eta 1.
    """
    recipe = Recipe(vae_steps=vae_steps, unet_steps=unet_steps, batch_size=batch_size, **settings)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if threads is not None:
        torch.set_num_threads(threads)
    load_before = os.getloadavg()
    start, cpu_start = time.perf_counter(), time.process_time()
    seconds: dict[str, float] = {}
    # CPU seconds of this process beside the wall clock: on a shared machine the wall time measures the
    # neighbours too, while at 1 thread the CPU time is what the recipe costs on an idle core.
    cpu_seconds: dict[str, float] = {}

    pipe = build_pipeline(recipe, seed)
    pipe.set_progress_bar_config(disable=True)
    vae_log = train_vae(pipe.vae, recipe, seed, progress)
    seconds["vae"] = time.perf_counter() - start
    cpu_seconds["vae"] = time.process_time() - cpu_start

    stats = latent_statistics(pipe.vae, seed, recipe.scaling_images, recipe.latent_std)
    pipe.vae.register_to_config(scaling_factor=stats["scaling_factor"])
    mark, cpu_mark = time.perf_counter(), time.process_time()
    unet_log = train_denoiser(pipe, recipe, seed, progress)
    seconds["unet"] = time.perf_counter() - mark
    cpu_seconds["unet"] = time.process_time() - cpu_mark

    mark, cpu_mark = time.perf_counter(), time.process_time()
    reward = ShapesAlignmentReward()
    heldout = shapes_prompts("heldout")[: recipe.eval_prompts]
    evaluations = {}
    for eta in (0.0, 1.0):
        result = evaluate_pipeline(
            pipe, heldout, recipe.eval_samples_per_prompt, recipe.eval_steps, recipe.eval_guidance_scale,
            seed=seed, eta=eta, reward=reward,
        )
        evaluations[f"eta{eta:g}"] = {k: result[k] for k in ("accuracy", "accuracy_by_shapes", "settings")}
    seconds["evaluation"] = time.perf_counter() - mark
    cpu_seconds["evaluation"] = time.process_time() - cpu_mark

    pipe.save_pretrained(out_dir, safe_serialization=True)
    seconds["total"] = time.perf_counter() - start
    cpu_seconds["total"] = time.process_time() - cpu_start
    metrics = {
        "recipe": asdict(recipe),
        "seed": seed,
        "parameters": {
            "unet": _parameters(pipe.unet),
            "text_encoder": _parameters(pipe.text_encoder),
            "vae": _parameters(pipe.vae),
        },
        "latents": stats,
        "losses": {"vae": vae_log, "unet": unet_log},
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "cpu_seconds": {k: round(v, 1) for k, v in cpu_seconds.items()},
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15min": {"start": [round(v, 2) for v in load_before],
                                   "end": [round(v, 2) for v in os.getloadavg()]},
        "cpu_count": os.cpu_count(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "diffusers": _version("diffusers"), "transformers": _version("transformers")},
        "heldout_evaluation": evaluations,
    }
    (out_dir / METRICS_NAME).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def _parser(prog: str) -> argparse.ArgumentParser:
    defaults = Recipe()
    p = argparse.ArgumentParser(
        prog=prog,
        description="Pretrain the shapes-tiny text-to-image model; the defaults reproduce the shipped one.",
    )
    p.add_argument("--out", required=True, help="directory for the pipeline and recipe_metrics.json")
    p.add_argument("--family", choices=("sd", "sd3"), default="sd",
                   help="sd: shapes-tiny (SD 1.5's components, DDPM loss); sd3: shapes-flow-tiny (SD3's, rectified "
                        "flow; --unet-steps sets its transformer steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=defaults.vae_steps)
    p.add_argument("--unet-steps", type=int, default=defaults.unet_steps)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per UNet step")
    p.add_argument("--attribute-dropout", type=float, default=defaults.attribute_dropout,
                   help="probability of leaving out each attribute phrase but the kind (0: full captions only)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; shapes-tiny shipped with 2, shapes-flow-tiny with 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: Optional[Iterable[str]] = None, prog: str = "fastdag toy pretrain") -> int:
    args = _parser(prog).parse_args(None if argv is None else list(argv))
    if args.family == "sd3":
        from fastdag.toy.pretrain_flow import FlowRecipe, pretrain_flow

        steps = args.unet_steps if args.unet_steps != Recipe.unet_steps else FlowRecipe.steps
        metrics = pretrain_flow(args.out, seed=args.seed, steps=steps, batch_size=args.batch_size,
                                attribute_dropout=args.attribute_dropout, progress=not args.no_progress,
                                threads=args.threads)
        print(json.dumps({"seconds": metrics["seconds"], "base_figures": metrics["base_figures"]}, indent=2))
        return 0
    try:
        metrics = pretrain(
            args.out,
            seed=args.seed,
            vae_steps=args.vae_steps,
            unet_steps=args.unet_steps,
            batch_size=args.batch_size,
            attribute_dropout=args.attribute_dropout,
            progress=not args.no_progress,
            threads=args.threads,
        )
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    summary = {name: ev["accuracy"] for name, ev in metrics["heldout_evaluation"].items()}
    print(json.dumps({"seconds": metrics["seconds"], "heldout_accuracy": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m fastdag.toy.pretrain"))
