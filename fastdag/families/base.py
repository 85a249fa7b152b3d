"""The model-family interface: a frozen diffusers pipeline plus LoRA, seen through the few operations DAG needs.

Rollout, objectives, engine and checkpoints only call these; each family (one module: sd, sdxl, sd3, flux, ddpm)
fills in what differs: how prompts become conditioning, how the denoiser is called, which sampler its pipeline uses
(and so x̂_0, the step's log-prob and p_B), where LoRA goes, and how its own pipeline loads the saved LoRA.

Shapes: states ``x`` [B, *latent_shape] (FLUX's latents unpacked to [C, H, W], so DAG's flow network sees an image);
``cond`` a :class:`Cond` of B rows (None when unconditional); model timesteps ``t`` [B] from ``sampler.timesteps``.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterable, Optional

import torch

from fastdag.config import ConfigError, LoraConfig, SampleConfig

log = logging.getLogger(__name__)
_LOGGED: set[str] = set()


def log_once(message: str) -> None:
    """A warning logged the first time it is raised in this process (fallbacks that would repeat every step)."""
    if message not in _LOGGED:
        _LOGGED.add(message)
        log.warning(message)


@dataclass
class Cond:
    """B prompts' conditioning: ``embeds`` [B, L, D], the sequence the denoiser (and DAG's flow network) attends
    to; ``pooled`` [B, P], the pooled text embedding of SDXL, SD3 and FLUX (None for SD 1.x/2.x)."""

    embeds: torch.Tensor
    pooled: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def __getitem__(self, index) -> "Cond":
        return Cond(self.embeds[index], None if self.pooled is None else self.pooled[index])

    def _map(self, fn) -> "Cond":
        return Cond(fn(self.embeds), None if self.pooled is None else fn(self.pooled))

    def to(self, *args, **kwargs) -> "Cond":
        return self._map(lambda t: t.to(*args, **kwargs))

    def expand(self, batch: int) -> "Cond":
        """A one-row Cond (the negative prompt) as ``batch`` rows, without copying."""
        return self._map(lambda t: t.expand(batch, *t.shape[1:]))

    def clone(self) -> "Cond":
        return self._map(torch.clone)

    def copy_(self, other: "Cond") -> None:
        self.embeds.copy_(other.embeds)
        if self.pooled is not None:
            self.pooled.copy_(other.pooled)

    @staticmethod
    def cat(parts: list["Cond"]) -> "Cond":
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        return Cond(torch.cat([p.embeds for p in parts]), pooled)


def xformers_works(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """(True, "") if xformers imports and a tiny ``memory_efficient_attention`` runs on ``device``."""
    try:
        import xformers.ops

        q = torch.zeros(1, 4, 1, 8, device=device, dtype=dtype)  # [B, M, heads, K]
        xformers.ops.memory_efficient_attention(q, q, q)
        return True, ""
    except Exception as e:  # ImportError, missing/incompatible compiled ops, unsupported device or dtype
        return False, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


class ModelFamily:
    """A frozen base pipeline plus LoRA on its denoiser.

    Subclasses set the class attributes and implement :meth:`_encode`, :meth:`forward` and :meth:`make_sampler`;
    the rest (CFG, decoding, LoRA, prompt caching, text-encoder offloading) is shared.
    """

    name: ClassVar[str]
    pipeline_class: ClassVar[str]  # the diffusers pipeline class this family loads (model_index.json's _class_name)
    denoiser_name: ClassVar[str] = "unet"  # the pipeline's attribute holding the denoiser ("unet" | "transformer")
    text_encoder_names: ClassVar[tuple[str, ...]] = ()
    lora_targets: ClassVar[list[str]] = ["to_q", "to_k", "to_v", "to_out.0"]
    # LoRA on a UNet is saved through the diffusers <-> peft key conversion (lora.down / lora_A names)
    lora_key_conversion: ClassVar[bool] = False

    def __init__(self, pipeline, device: torch.device, dtype: torch.dtype, resolution: Optional[int] = None):
        self.pipeline = pipeline
        self.device, self.dtype = device, dtype
        self.denoiser: torch.nn.Module = getattr(pipeline, self.denoiser_name)
        for module in [*self.frozen_modules(), self.denoiser]:
            module.requires_grad_(False)
            module.to(device)
            if module.dtype != dtype:  # diffusers warns on any dtype cast, even a no-op one
                module.to(dtype=dtype)
        for module in self.frozen_modules():
            module.eval()
        self.latent_shape = self._latent_shape(resolution)  # (C, H, W)
        self.xhat_decoder = None
        self.cuda_graphs: dict = {}  # rollout step graphs by (batch, guidance, sampler settings), see rollout.GraphedStep
        self._prompt_cache: dict[str, Cond] = {}  # one row per prompt, on the CPU
        self._text_device = device  # where the text encoders run (the CPU once offloaded)

    # ----- what every family provides ------------------------------------------------------------------------
    def _latent_shape(self, resolution: Optional[int]) -> tuple[int, ...]:
        raise NotImplementedError

    def _encode(self, prompts: list[str]) -> Cond:
        """B prompts -> their Cond on the text encoders' device (no cache)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Optional[Cond], guidance: Optional[float] = None) -> torch.Tensor:
        """The denoiser's raw output [B, *latent_shape] for states x [B, ...] at model timesteps t [B]."""
        raise NotImplementedError

    def make_sampler(self, num_steps: int, sample: SampleConfig, *, reduce: str = "mean", backend: str = "auto",
                     stochasticity: Optional[float] = None):
        """The family's sampler over ``num_steps`` steps (see ``fastdag.samplers``); ``stochasticity`` overrides the
        config's η (DDIM) or noise level (flow), e.g. for evaluation."""
        raise NotImplementedError

    # ----- shared --------------------------------------------------------------------------------------------
    @property
    def conditional(self) -> bool:
        return bool(self.text_encoder_names)

    @property
    def uses_cfg(self) -> bool:
        """Whether sample.guidance_scale means classifier-free guidance (two denoiser passes); FLUX-dev's guidance
        is distilled into one pass instead."""
        return self.conditional

    @property
    def flow_cond_dim(self) -> Optional[int]:
        """The width D of ``Cond.embeds``: the cross-attention width of DAG's flow network (None: unconditional)."""
        raise NotImplementedError

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [getattr(self.pipeline, n) for n in (*self.text_encoder_names, "vae") if getattr(self.pipeline, n, None) is not None]

    def text_encoders(self) -> list[torch.nn.Module]:
        return [m for m in (getattr(self.pipeline, n, None) for n in self.text_encoder_names) if m is not None]

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        # Autocast's weight-cast cache must be off while a CUDA graph is captured (the cached casts would be
        # freed after capture while the graph still points at them).
        capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        return torch.autocast(self.device.type, dtype=self.dtype, cache_enabled=not capturing)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Optional[Cond]:
        """B prompts -> Cond [B, ...] on the model's device in its dtype (None when unconditional). Each distinct
        prompt is encoded once and cached (a rollout draws the same prompts epoch after epoch)."""
        if not self.conditional:
            return None
        missing = list(dict.fromkeys(p for p in prompts if p not in self._prompt_cache))
        if missing:
            with self.autocast():
                encoded = self._encode(missing).to(self.dtype)
            for i, prompt in enumerate(missing):
                self._prompt_cache[prompt] = encoded[i : i + 1].to("cpu")
        return Cond.cat([self._prompt_cache[p] for p in prompts]).to(self.device)

    def encode_negative(self, prompt: str) -> Optional[Cond]:
        """The [1, ...] Cond of CFG's unconditional half."""
        return self.encode_prompts([prompt])

    def offload_text_encoders(self, prompts: Iterable[str]) -> None:
        """Encode ``prompts`` now, then move the text encoders to the CPU (``model.offload_text_encoders``): later
        prompts are still encoded, on the CPU. Frees their memory (T5-XXL: 9 GB in bf16) for the rollout."""
        self.encode_prompts(list(dict.fromkeys(prompts)))
        for module in self.text_encoders():
            module.to("cpu")
        self._text_device = torch.device("cpu")

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Optional[Cond], uncond: Optional[Cond],
                guidance_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(guided output, conditional output), both [B, *latent_shape] fp32: ε̂ for DDIM families, the velocity v̂
        for flow-matching ones. With CFG the denoiser runs once on the doubled batch [uncond; cond]; without it
        (guidance 1, unconditional, or distilled guidance) once, and both outputs are the same tensor."""
        with self.autocast():
            if not self.uses_cfg or uncond is None or guidance_scale == 1.0:
                out = self.forward(x, t, cond, guidance=guidance_scale).float()
                return out, out
            b = x.shape[0]
            both = self.forward(torch.cat([x, x]), torch.cat([t, t]), Cond.cat([uncond.expand(b), cond]))
            out_u, out_c = both.float().chunk(2)
        return out_u + guidance_scale * (out_c - out_u), out_c

    @contextlib.contextmanager
    def adapters_disabled(self):
        """The base model: every LoRA layer of the denoiser off inside the block (GRPO's KL reference)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for m in self.denoiser.modules() if isinstance(m, BaseTunerLayer)]
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in layers:
                layer.enable_adapters(True)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.pipeline.vae.config.block_out_channels) - 1)

    def _latent_side(self, native: int, resolution: Optional[int], multiple: int = 1) -> int:
        """Latent height/width for ``model.resolution`` pixels (None: the model's native size)."""
        if resolution is None:
            return native
        side, rem = divmod(resolution, self.vae_scale_factor * multiple)
        if rem or side < 1:
            raise ConfigError(f"model.resolution: {resolution} is not a positive multiple of "
                              f"{self.vae_scale_factor * multiple} (the VAE's downsampling{' x 2 for packing' if multiple > 1 else ''})")
        return side * multiple

    @torch.no_grad()
    def decode(self, x: torch.Tensor, cheap: bool = False) -> torch.Tensor:
        """Latents [B, *latent_shape] -> images float [B, 3, H, W] in [0, 1]; ``cheap`` decodes with
        ``xhat_decoder`` (AutoencoderTiny) when one is loaded, else with the VAE."""
        vae = self.xhat_decoder if cheap and self.xhat_decoder is not None else self.pipeline.vae
        with self.autocast():
            latents = x.to(self.dtype) / vae.config.scaling_factor
            shift = getattr(vae.config, "shift_factor", None)
            if shift is not None:  # SD3 and FLUX VAEs: latents = (z − shift) · scale
                latents = latents + shift
            images = vae.decode(latents).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def load_xhat_decoder(self, path: str) -> None:
        """A cheaper decoder for intermediate x̂_0 states: a diffusers ``AutoencoderTiny`` directory (TAESD; TAESD3 or
        TAEF1 for the flow-matching families)."""
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
        """Use ``backend`` (sdpa | xformers) in the denoiser and VAE; returns the backend actually used.

        xformers is used only if a tiny ``memory_efficient_attention`` call runs here: an installed wheel built
        for another torch imports but fails in its ops (``diffusers.utils.is_xformers_available`` says True).
        """
        if backend != "xformers":
            return "sdpa"
        ok, why = xformers_works(self.device, self.dtype)
        if not ok:
            log_once(f"model.attention=xformers: xformers does not run here ({why}); using PyTorch SDPA")
            return "sdpa"
        for module in [self.denoiser, *([self.pipeline.vae] if self.conditional else [])]:
            module.enable_xformers_memory_efficient_attention()
        return "xformers"

    def apply_memory_format(self) -> None:
        for module in [self.denoiser, *([self.pipeline.vae] if self.conditional else [])]:
            module.to(memory_format=torch.channels_last)

    # ----- LoRA ----------------------------------------------------------------------------------------------
    def add_lora(self, cfg: LoraConfig) -> list[torch.nn.Parameter]:
        """Add LoRA layers to the denoiser (peft) at ``lora.target_modules`` (default: the family's
        :attr:`lora_targets`); returns the trainable parameters, kept in fp32."""
        from peft import LoraConfig as PeftLoraConfig

        targets = cfg.target_modules if cfg.target_modules is not None else list(self.lora_targets)
        peft_cfg = PeftLoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha if cfg.alpha is not None else cfg.rank,
            init_lora_weights="gaussian" if cfg.init == "gaussian" else True,
            target_modules=targets,
        )
        try:
            if hasattr(self.denoiser, "add_adapter"):
                self.denoiser.add_adapter(peft_cfg)
            else:  # UNet2DModel has no diffusers adapter mixin; inject through peft directly
                from peft import inject_adapter_in_model

                inject_adapter_in_model(peft_cfg, self.denoiser)
        except ValueError as e:
            raise ConfigError(f"lora.target_modules: {str(e).splitlines()[0]}") from None
        params = [p for p in self.denoiser.parameters() if p.requires_grad]
        if not params:
            raise ConfigError(f"lora.target_modules: {targets} matched no module of the {self.denoiser_name}")
        for p in params:
            p.data = p.data.float()
        return params

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(self.denoiser)

    def save_lora(self, directory: Path) -> None:
        """Diffusers LoRA format, loadable with the family's pipeline: ``Pipeline.load_lora_weights(directory)``."""
        from diffusers.utils import convert_state_dict_to_diffusers

        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.lora_state_dict().items()}
        if self.lora_key_conversion:
            state = convert_state_dict_to_diffusers(state)
        directory.mkdir(parents=True, exist_ok=True)
        # the adapter's config (rank, alpha, targets) rides in the file, so a pipeline loads alpha != rank correctly
        metadata = self.denoiser.peft_config["default"].to_dict()
        type(self.pipeline).save_lora_weights(directory, **{f"{self.denoiser_name}_lora_layers": state,
                                                            f"{self.denoiser_name}_lora_adapter_metadata": metadata})

    def lora_from_file(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A saved LoRA file's state dict (what :meth:`save_lora` wrote) as the denoiser's peft state dict."""
        state = {k.removeprefix(f"{self.denoiser_name}."): v for k, v in state.items()}
        if self.lora_key_conversion:
            from diffusers.utils import convert_unet_state_dict_to_peft

            state = convert_unet_state_dict_to_peft(state)
        return state
