"""Base models: a diffusers pipeline (preset, local directory or hub id), frozen, with LoRA through peft.

:class:`DiffusionModel` hides the two model kinds behind one interface: ``text-to-image`` (a
``StableDiffusionPipeline``: CLIP text encoder, latent UNet with cross-attention and CFG, VAE decode) and
``unconditional`` (a ``DDPMPipeline``: pixel-space ``UNet2DModel``, no prompt, no CFG, no VAE).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from fastdag.config import ConfigError, LoraConfig, ModelConfig
from fastdag.errors import without_trace_hints
from fastdag.presets import PRESETS

log = logging.getLogger(__name__)
_LOGGED: set[str] = set()


def log_once(message: str) -> None:
    """A warning logged the first time it is raised in this process (fallbacks that would repeat every step)."""
    if message not in _LOGGED:
        _LOGGED.add(message)
        log.warning(message)


def xformers_works(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """(True, "") if xformers imports and a tiny ``memory_efficient_attention`` runs on ``device``."""
    try:
        import xformers.ops

        q = torch.zeros(1, 4, 1, 8, device=device, dtype=dtype)  # [B, M, heads, K]
        xformers.ops.memory_efficient_attention(q, q, q)
        return True, ""
    except Exception as e:  # ImportError, missing/incompatible compiled ops, unsupported device or dtype
        return False, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device: {name!r} asked for, but CUDA is not available; use cpu or auto")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_pipeline(cfg: ModelConfig):
    """The pipeline named by ``model.pretrained``; a missing local path or an unreachable hub id is a ConfigError."""
    name = cfg.pretrained
    if name in PRESETS:
        return PRESETS[name]()
    from fastdag import assets

    if name in assets.PIPELINES:
        path = assets.PIPELINES[name]()
        if not (path / "model_index.json").is_file():
            raise ConfigError(
                f"model.pretrained: the embedded model {name!r} is not in this install ({path}); "
                "build it with `fastdag toy pretrain --out DIR` and pass DIR"
            )
    else:
        path = Path(name).expanduser()
    looks_local = path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1
    if looks_local and not (path / "model_index.json").is_file():
        what = "is not a diffusers pipeline directory (no model_index.json)" if path.exists() else "no such directory"
        raise ConfigError(
            f"model.pretrained: {name!r} {what}; give a preset ({', '.join(PRESETS)}), a pipeline directory or a hub id"
        )
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.from_pretrained(str(path) if looks_local else name, revision=cfg.revision)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"model.pretrained: could not load {name!r}: {without_trace_hints(first)}") from None


def ddim_scheduler_from(scheduler):
    """DDIM with the base scheduler's training noise schedule (the sampler the paper uses)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(scheduler.config)


def step_settings(config) -> tuple[str, Optional[float]]:
    """(prediction_type, clip range or None) of a DDIM scheduler config; settings the step math does not implement
    are a one-line ConfigError (checked when the model loads, before anything is sampled)."""
    from fastdag.kernels.ddim_step import PREDICTION_TYPES

    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"model.pretrained: the scheduler's prediction_type {prediction_type!r} is not supported; "
                          f"fastdag's DDIM step implements {', '.join(PREDICTION_TYPES)}")
    if config.get("thresholding", False):
        raise ConfigError("model.pretrained: the scheduler sets thresholding=True (dynamic thresholding of x̂_0), "
                          "which fastdag's DDIM step does not implement; use a scheduler config without it")
    clip = float(config.get("clip_sample_range", 1.0)) if config.get("clip_sample", False) else None
    return prediction_type, clip


@dataclass
class StepSchedule:
    """The DDIM steps of one trajectory, precomputed on the device so the hot loop never touches the host.

    Step i goes from x_{t_i} to x_{t_{i+1}}: ``timesteps[i]`` = t_i, ``alpha_t[i]`` = ᾱ_{t_i}, ``alpha_prev[i]`` =
    ᾱ at diffusers' previous timestep (``final_alpha_cumprod`` past 0). All [T].
    """

    timesteps: torch.Tensor  # [T] long
    alpha_t: torch.Tensor  # [T] fp32
    alpha_prev: torch.Tensor  # [T] fp32

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    def score_scale(self, eta: float, prediction_type: str = "epsilon") -> torch.Tensor:
        """[T] |∂μ_θ/∂o| / σ_t: how strongly step i's log p_θ(x_{t-1} | x_t) reacts to the model output o
        (∂ log p_θ / ∂o = z · this, z the step's standard-normal noise; x̂_0's clip, where a model has one, is
        ignored). For ε̂-prediction about 0.6–0.9 on most of a 20-step SD schedule but 5.4 at its second-to-last
        step, where σ_t collapses; NaN where σ_t = 0 (no density)."""
        a, ap = self.alpha_t, self.alpha_prev
        sigma = eta * ((1 - ap) / (1 - a)).sqrt() * (1 - a / ap).sqrt()
        direction = (1 - ap - sigma**2).clamp_min(0).sqrt()
        # ∂x̂_0/∂o and ∂ε̂/∂o of fastdag.kernels.ddim_step.predict_x0_eps; μ = √ᾱ_{t−1} x̂_0 + direction · ε̂
        d_x0, d_eps = {
            "epsilon": (-(1 - a).sqrt() / a.sqrt(), torch.ones_like(a)),
            "v_prediction": (-(1 - a).sqrt(), a.sqrt()),
            "sample": (torch.ones_like(a), -a.sqrt() / (1 - a).sqrt()),
        }[prediction_type]
        dmu = ap.sqrt() * d_x0 + direction * d_eps
        return torch.where(sigma > 0, dmu.abs() / sigma, torch.full_like(sigma, float("nan")))


def step_weights(schedule: StepSchedule, eta: float, weighting: str,
                 prediction_type: str = "epsilon") -> Optional[torch.Tensor]:
    """[T] per-step loss weights of ``dag.step_weighting`` (None: uniform). score_scale: 1 / (the step's
    log-prob score scale), mean 1 over the steps; deterministic steps (σ_t = 0) keep weight 1."""
    if weighting == "uniform":
        return None
    inverse = 1 / schedule.score_scale(eta, prediction_type)
    stochastic = torch.isfinite(inverse)
    if not stochastic.any():
        return None
    return torch.where(stochastic, inverse / inverse[stochastic].mean(), torch.ones_like(inverse))


def ddim_step_schedule(scheduler, num_steps: int, device: torch.device) -> StepSchedule:
    scheduler.set_timesteps(num_steps)
    timesteps = scheduler.timesteps.to(torch.long)
    prev = timesteps - scheduler.config.num_train_timesteps // num_steps
    alphas = scheduler.alphas_cumprod.to(torch.float32)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32)
    alpha_prev = torch.where(prev >= 0, alphas[prev.clamp_min(0)], final)
    return StepSchedule(timesteps.to(device), alphas[timesteps].to(device), alpha_prev.to(device))


class DiffusionModel:
    """A frozen base pipeline plus LoRA, seen through the few operations DAG needs.

    Shapes: latents/pixels ``x`` [B, *latent_shape]; ``cond`` prompt embeddings [B, L, D] (None when
    unconditional); timesteps ``t`` [B] long.
    """

    def __init__(self, pipeline, device: torch.device, dtype: torch.dtype):
        from diffusers import DDPMPipeline, StableDiffusionPipeline

        if isinstance(pipeline, StableDiffusionPipeline):
            self.kind = "text-to-image"
        elif isinstance(pipeline, DDPMPipeline):
            self.kind = "unconditional"
        else:
            raise ConfigError(
                f"model.pretrained: {type(pipeline).__name__} is not supported; "
                "use a StableDiffusionPipeline or a DDPMPipeline"
            )
        self.pipeline = pipeline
        self.device, self.dtype = device, dtype
        self.unet = pipeline.unet
        self.scheduler = ddim_scheduler_from(pipeline.scheduler)
        pipeline.scheduler = self.scheduler
        self.prediction_type, self.clip_sample_range = step_settings(self.scheduler.config)
        for module in [*self.frozen_modules(), self.unet]:
            module.requires_grad_(False)
            module.to(device)
            if module.dtype != dtype:  # diffusers warns on any dtype cast, even a no-op one
                module.to(dtype=dtype)
        for module in self.frozen_modules():
            module.eval()
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        self.latent_shape = (self.unet.config.in_channels, *size)
        self.xhat_decoder = None
        self.cuda_graphs: dict = {}  # rollout step graphs by (batch, guidance, eta, reduce), see rollout.GraphedStep

    @property
    def step_kwargs(self) -> dict:
        """The scheduler settings every DDIM step of this model needs (``fastdag.kernels.ddim_step``'s keyword args)."""
        return {"prediction_type": self.prediction_type, "clip_sample_range": self.clip_sample_range}

    @property
    def conditional(self) -> bool:
        return self.kind == "text-to-image"

    @property
    def cond_dim(self) -> Optional[int]:
        return self.unet.config.cross_attention_dim if self.conditional else None

    def frozen_modules(self) -> list[torch.nn.Module]:
        if self.conditional:
            return [self.pipeline.text_encoder, self.pipeline.vae]
        return []

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        # Autocast's weight-cast cache must be off while a CUDA graph is captured (the cached casts would be
        # freed after capture while the graph still points at them).
        capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        return torch.autocast(self.device.type, dtype=self.dtype, cache_enabled=not capturing)

    @contextlib.contextmanager
    def adapters_disabled(self):
        """The base model: every LoRA layer of the UNet off inside the block (GRPO's KL reference)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for m in self.unet.modules() if isinstance(m, BaseTunerLayer)]
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in layers:
                layer.enable_adapters(True)

    def load_xhat_decoder(self, path: str) -> None:
        """A cheaper decoder for intermediate x̂_0 states: a diffusers ``AutoencoderTiny`` directory (TAESD)."""
        if not self.conditional:
            raise ConfigError("dag.xhat_decoder: only latent (text-to-image) models have a decoder to replace")
        directory = Path(path).expanduser()
        if not (directory / "config.json").is_file():
            raise ConfigError(f"dag.xhat_decoder: {path!r} is not a diffusers AutoencoderTiny directory (no config.json)")
        from diffusers import AutoencoderTiny

        try:
            decoder = AutoencoderTiny.from_pretrained(str(directory))
        except (OSError, ValueError) as e:
            raise ConfigError(f"dag.xhat_decoder: could not load {path!r}: {str(e).splitlines()[0]}") from None
        decoder.requires_grad_(False).eval().to(self.device, dtype=self.dtype)
        self.xhat_decoder = decoder

    def set_attention(self, backend: str) -> str:
        """Use ``backend`` (sdpa | xformers) in the UNet and VAE; returns the backend actually used.

        xformers is used only if a tiny ``memory_efficient_attention`` call runs here: an installed wheel built
        for another torch imports but fails in its ops (``diffusers.utils.is_xformers_available`` says True).
        """
        if backend != "xformers":
            return "sdpa"
        ok, why = xformers_works(self.device, self.dtype)
        if not ok:
            log_once(f"model.attention=xformers: xformers does not run here ({why}); using PyTorch SDPA")
            return "sdpa"
        for module in [self.unet, *([self.pipeline.vae] if self.conditional else [])]:
            module.enable_xformers_memory_efficient_attention()
        return "xformers"

    def apply_memory_format(self) -> None:
        for module in [self.unet, *([self.pipeline.vae] if self.conditional else [])]:
            module.to(memory_format=torch.channels_last)

    def add_lora(self, cfg: LoraConfig) -> list[torch.nn.Parameter]:
        """Add LoRA layers to the UNet (peft); returns the trainable parameters, kept in fp32."""
        from peft import LoraConfig as PeftLoraConfig

        peft_cfg = PeftLoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha if cfg.alpha is not None else cfg.rank,
            init_lora_weights="gaussian" if cfg.init == "gaussian" else True,
            target_modules=cfg.target_modules,
        )
        try:
            if hasattr(self.unet, "add_adapter"):
                self.unet.add_adapter(peft_cfg)
            else:  # UNet2DModel has no diffusers adapter mixin; inject through peft directly
                from peft import inject_adapter_in_model

                inject_adapter_in_model(peft_cfg, self.unet)
        except ValueError as e:
            raise ConfigError(f"lora.target_modules: {str(e).splitlines()[0]}") from None
        params = [p for p in self.unet.parameters() if p.requires_grad]
        if not params:
            raise ConfigError(f"lora.target_modules: {cfg.target_modules} matched no module of the UNet")
        for p in params:
            p.data = p.data.float()
        return params

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Optional[torch.Tensor]:
        """[B, L, D] CLIP last hidden states, or None for an unconditional model."""
        if not self.conditional:
            return None
        tok = self.pipeline.tokenizer
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        with self.autocast():
            return self.pipeline.text_encoder(ids.input_ids.to(self.device))[0].to(self.dtype)

    def predict_eps(
        self, x: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor], uncond: Optional[torch.Tensor],
        guidance_scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(ε̂ CFG-combined, ε_c conditional), both [B, *latent_shape] fp32.

        ``uncond`` is the [1, L, D] negative-prompt embedding; with guidance 1 (or unconditional) one forward.
        """
        with self.autocast():
            if not self.conditional:
                eps = self.unet(x.to(self.dtype), t).sample.float()
                return eps, eps
            if guidance_scale == 1.0:
                eps = self.unet(x.to(self.dtype), t, encoder_hidden_states=cond).sample.float()
                return eps, eps
            b = x.shape[0]
            x2 = torch.cat([x, x]).to(self.dtype)
            ctx = torch.cat([uncond.expand(b, -1, -1), cond])
            eps_u, eps_c = self.unet(x2, torch.cat([t, t]), encoder_hidden_states=ctx).sample.float().chunk(2)
        return eps_u + guidance_scale * (eps_c - eps_u), eps_c

    @torch.no_grad()
    def decode(self, x: torch.Tensor, cheap: bool = False) -> torch.Tensor:
        """Latents (or pixels) [B, *latent_shape] -> images float [B, 3, H, W] in [0, 1].

        ``cheap`` decodes with ``xhat_decoder`` (AutoencoderTiny) when one is loaded, else with the VAE.
        """
        if self.conditional:
            vae = self.xhat_decoder if cheap and self.xhat_decoder is not None else self.pipeline.vae
            with self.autocast():
                x = vae.decode(x.to(self.dtype) / vae.config.scaling_factor).sample
        return (x.float() / 2 + 0.5).clamp(0, 1)

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(self.unet)

    def save_lora(self, directory: Path) -> None:
        """Diffusers LoRA format, loadable with ``StableDiffusionPipeline.load_lora_weights(directory)``.

        The unconditional kind has no diffusers LoRA loader; its adapter is saved as a peft state dict in the
        same file name, to be loaded with ``peft.set_peft_model_state_dict``.
        """
        from diffusers.utils import convert_state_dict_to_diffusers

        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.lora_state_dict().items()}
        directory.mkdir(parents=True, exist_ok=True)
        if self.conditional:
            type(self.pipeline).save_lora_weights(directory, unet_lora_layers=convert_state_dict_to_diffusers(state))
        else:
            from safetensors.torch import save_file

            save_file(state, str(directory / "pytorch_lora_weights.safetensors"))


def load_lora_into(model: "DiffusionModel", directory: Path) -> None:
    """Load a checkpoint's LoRA (what :meth:`DiffusionModel.save_lora` wrote) into the model's peft adapter."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = directory / "pytorch_lora_weights.safetensors"
    if not path.is_file():
        raise ConfigError(f"{directory}: no LoRA weights (pytorch_lora_weights.safetensors)")
    state = load_file(str(path))
    if model.conditional:  # diffusers format: "unet." + lora.down/up names
        from diffusers.utils import convert_unet_state_dict_to_peft

        state = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in state.items()})
    result = set_peft_model_state_dict(model.unet, state, adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ConfigError(f"{path}: LoRA weights for another model or LoRA config (e.g. {unexpected[0]})")


def build_model(model_cfg: ModelConfig, lora_cfg: LoraConfig) -> tuple[DiffusionModel, list[torch.nn.Parameter]]:
    device = resolve_device(model_cfg.device)
    dtype = resolve_dtype(model_cfg.dtype, device)
    model = DiffusionModel(load_pipeline(model_cfg), device, dtype)
    model.attention = model.set_attention(model_cfg.attention)
    if model_cfg.channels_last:
        model.apply_memory_format()
    params = model.add_lora(lora_cfg)
    if model_cfg.compile:
        model.unet.compile()  # in place: module names, LoRA state dicts and hooks stay as they are
    return model, params
