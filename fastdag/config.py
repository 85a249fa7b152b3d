"""One config tree: dataclass defaults in code, YAML files that override them, dotted ``key=value`` overrides last.

Every field carries its help text in ``metadata["help"]`` (shown by ``fastdag train --help``). Cross-field checks
live in each section's ``__post_init__``. Any problem with a config raises :class:`ConfigError` with one line
that names the key and what is allowed; the CLI turns it into exit status 2.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from fastdag.errors import short_repr


class ConfigError(ValueError):
    """A config problem, reported to the user as one line (exit status 2)."""


# What a config may cost. A config file is a few kilobytes; the cap stops a wrong path (a dataset, a log) from
# being read whole. YAML aliases are allowed (shared settings), but the document they expand to is capped: nine
# levels of "billion laughs" fit in 1 KB and expand to 9^9 values, which took 107 s and 9.6 GB to turn into an
# error message. 100,000 nodes is far beyond any config and costs milliseconds to check.
MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_NODES = 100_000


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a help text; list/tuple/dict defaults are copied per instance."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


# train.seed + 1 seeds a torch.Generator, which takes at most 2**64 - 1; numpy's and Python's seeds are unbounded.
MAX_SEED = 2**63 - 1


def _plain_name(name: str) -> bool:
    """A single path component: a run name may not climb out of (or be) logging.output_dir."""
    return name.strip() not in ("", ".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def _check_train_ranges(t: "TrainConfig") -> None:
    """Ranges torch's AdamW, the RNGs and the resume logic would otherwise reject with a traceback mid-run."""
    _check(0 <= t.adam_beta1 < 1, "train.adam_beta1", f"must be in [0, 1), got {t.adam_beta1}")
    _check(0 <= t.adam_beta2 < 1, "train.adam_beta2", f"must be in [0, 1), got {t.adam_beta2}")
    _check(t.adam_weight_decay >= 0, "train.adam_weight_decay", f"must be >= 0, got {t.adam_weight_decay}")
    _check(t.adam_epsilon > 0, "train.adam_epsilon", f"must be > 0, got {t.adam_epsilon}")
    _check(0 <= t.seed < MAX_SEED, "train.seed", f"must be in [0, {MAX_SEED - 1}], got {t.seed}")
    _check(t.resume is None or t.resume.strip() != "", "train.resume",
           "is empty; give latest or a checkpoint directory, or leave it out to start a new run")


@dataclass
class ModelConfig:
    pretrained: str = _f(
        "tiny-random",
        "Base model: a preset (tiny-random, tiny-random-ddpm, tiny-random-sdxl, tiny-random-sd3, tiny-random-flux, "
        "sd15-random, sd35-medium-random, flux-dev-random), a local diffusers pipeline directory or a hub id such as "
        "stabilityai/stable-diffusion-3.5-medium. The model family (sd, sdxl, sd3, flux, ddpm) follows from the "
        "pipeline's class: StableDiffusion, StableDiffusionXL, StableDiffusion3, Flux or DDPM Pipeline.",
    )
    resolution: Optional[int] = _f(
        None,
        "Image height and width in pixels (None: the model's native size, e.g. 512 for SD 1.5, 1024 for SDXL, SD3.5 "
        "and FLUX). Flow-GRPO trains SD3.5 Medium and FLUX at 512.",
    )
    offload_text_encoders: bool = _f(
        False,
        "Encode the training, evaluation and negative prompts once at start, then move the text encoders to the CPU "
        "(T5-XXL alone is 9 GB in bf16). Prompt embeddings are cached per prompt either way.",
    )
    revision: Optional[str] = _f(None, "Hub revision of the base model.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f(
        "auto", "Dtype of the frozen base weights: auto = bfloat16 on GPU, float32 on CPU."
    )
    device: str = _f("auto", "Device: auto (cuda if available, else cpu), cpu, cuda or cuda:N.")
    attention: Literal["sdpa", "xformers"] = _f(
        "sdpa",
        "Attention backend of the UNet and VAE: sdpa (PyTorch scaled_dot_product_attention) or xformers (used only "
        "if its ops run on this machine; otherwise logged once and SDPA is kept).",
    )
    channels_last: bool = _f(
        False, "Channels-last memory format for the UNet and VAE (pays on GPUs with bf16/fp16 convolutions)."
    )
    compile: bool = _f(
        False,
        "torch.compile the UNet in place (pays on a GPU over long runs: minutes of compilation; on a CPU it took "
        "~100 s for ~8%).",
    )

    def __post_init__(self) -> None:
        _check(self.pretrained.strip() != "", "model.pretrained", "is empty; give a preset, a directory or a hub id")
        _check(self.resolution is None or self.resolution >= 1, "model.resolution",
               f"must be a positive number of pixels (or null), got {self.resolution}")
        _check(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device) is not None, "model.device",
               f"must be auto, cpu, cuda, cuda:N or mps, got {short_repr(self.device)}")


@dataclass
class LoraConfig:
    rank: int = _f(4, "LoRA rank (official config: 4).")
    alpha: Optional[float] = _f(None, "LoRA alpha; None = rank (scale 1), as the official code.")
    target_modules: Optional[list[str]] = _f(
        None,
        "Denoiser modules that get LoRA layers; None = the family's: to_q/to_k/to_v/to_out.0 for the UNets (the "
        "official config), Flow-GRPO's eight attention projections of both streams for SD3 and FLUX.",
    )
    init: Literal["gaussian", "default", "zeros"] = _f(
        "gaussian", "LoRA init: gaussian (peft's gaussian A, zero B), default (kaiming A, zero B)."
    )

    def __post_init__(self) -> None:
        _check(self.rank > 0, "lora.rank", f"must be a positive integer, got {self.rank}")
        _check(self.alpha is None or self.alpha > 0, "lora.alpha", f"must be > 0 (or null), got {self.alpha}")
        _check(self.target_modules is None or len(self.target_modules) > 0, "lora.target_modules",
               "must name at least one module (or null for the family's)")


@dataclass
class SampleConfig:
    num_steps: int = _f(50, "Sampler steps T per trajectory (paper: 50 DDIM steps; Flow-GRPO: 10 flow steps).")
    eta: float = _f(
        1.0, "DDIM eta of the UNet families (paper: 1, the DDPM variance; 0 makes every step deterministic)."
    )
    noise_level: float = _f(
        0.7,
        "Flow-matching families (SD3, FLUX): the SDE noise level a (Flow-GRPO: 0.7); 0 is the deterministic Euler "
        "step of the model's own scheduler.",
    )
    sde_type: Literal["sde", "cps"] = _f(
        "sde",
        "Flow-matching families: sde (Flow-GRPO's SDE, sigma_t = a*sqrt(sigma/(1-sigma))) or cps "
        "(coefficients-preserving sampling, std = sigma' * sin(a*pi/2): less noisy samples).",
    )
    guidance_scale: float = _f(5.0, "Classifier-free guidance weight w (paper: 5); 1 disables CFG.")
    batch_size: int = _f(
        8, "Trajectories per rollout batch, over all processes (each of N processes denoises batch_size / N)."
    )
    num_batches_per_epoch: int = _f(4, "Rollout batches per epoch (trajectories per epoch = batch_size x this).")
    group_size: int = _f(
        1,
        "Trajectories per prompt in each rollout batch (flow_grpo's num_image_per_prompt): batch_size / group_size "
        "prompts are drawn and each is sampled group_size times with its own noise. GRPO needs >= 2.",
    )
    negative_prompt: str = _f("", "Prompt for the unconditional half of the CFG batch.")
    cuda_graphs: bool = _f(
        False,
        "Capture the static-shape rollout step (CFG UNet forward + DDIM step) in a CUDA graph per batch size and "
        "replay it; CUDA only (on a CPU it is logged once and the rollout runs eager).",
    )

    def __post_init__(self) -> None:
        _check(self.num_steps >= 1, "sample.num_steps", f"must be >= 1, got {self.num_steps}")
        # eta > 1 makes σ_t exceed the DDIM bound: √(1 − ᾱ_{t−1} − σ_t²) is then imaginary (NaN)
        _check(0 <= self.eta <= 1, "sample.eta", f"must be in [0, 1], got {self.eta}")
        _check(0 <= self.noise_level <= 1, "sample.noise_level", f"must be in [0, 1], got {self.noise_level}")
        _check(self.guidance_scale >= 0, "sample.guidance_scale", f"must be >= 0, got {self.guidance_scale}")
        _check(self.batch_size >= 1, "sample.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.num_batches_per_epoch >= 1, "sample.num_batches_per_epoch", "must be >= 1")
        _check(self.group_size >= 1 and self.batch_size % self.group_size == 0, "sample.group_size",
               f"must be >= 1 and divide sample.batch_size {self.batch_size}, got {self.group_size}")


@dataclass
class TrainConfig:
    epochs: int = _f(100, "Epochs; each samples trajectories, then trains on them.")
    batch_size: int = _f(
        8, "Trajectories per training minibatch, over all processes (each of N processes takes batch_size / N)."
    )
    gradient_accumulation_steps: int = _f(
        4, "Minibatches accumulated per optimizer step (each also accumulates over its timesteps)."
    )
    num_inner_epochs: int = _f(1, "Passes over each epoch's samples.")
    timesteps_per_micro_step: int = _f(
        1,
        "Trained timesteps of a minibatch evaluated in one forward/backward (train.batch_size x this many "
        "transitions); must divide the trained timesteps. The same gradient and optimizer steps as one at a time "
        "(1, the official code); larger is faster where small batches leave the device idle (CPUs, small "
        "models) and needs that many times the activation memory.",
    )
    timestep_fraction: float = _f(1.0, "Fraction of each trajectory's transitions trained on (0, 1].")
    learning_rate: float = _f(3e-4, "AdamW learning rate of the LoRA parameters (paper: 3e-4).")
    flow_learning_rate: float = _f(3e-4, "AdamW learning rate of the flow network (paper: 3e-4).")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_weight_decay: float = _f(1e-4, "AdamW weight decay.")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _f(1.0, "Gradient-norm clip (paper: 1.0); 0 disables.")
    grad_clip: Literal["separate", "joint"] = _f(
        "separate",
        "How max_grad_norm applies: separate (the official code: the LoRA's and the flow network's gradients are "
        "each clipped to max_grad_norm) or joint (one norm over both, so a large flow gradient, e.g. at beta 100, "
        "shrinks the LoRA step).",
    )
    seed: int = _f(0, "Seed of everything: model init, noise, prompts, shuffles.")
    on_non_finite: Literal["stop", "skip"] = _f(
        "stop",
        "A non-finite loss term or gradient norm at an optimizer step: stop (one line naming the epoch, step and "
        "term; no checkpoint is written) or skip (drop that step's update and count it as skipped_steps in "
        "metrics.jsonl). Non-finite rewards always stop the run.",
    )
    resume: Optional[str] = _f(
        None,
        "Resume from a checkpoint: latest (the newest complete checkpoint of logging.output_dir/logging.run_name; "
        "a fresh start when there is none yet) or the path of a checkpoint directory.",
    )

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "train.epochs", f"must be >= 1, got {self.epochs}")
        _check(self.batch_size >= 1, "train.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps", "must be >= 1")
        _check(self.num_inner_epochs >= 1, "train.num_inner_epochs", "must be >= 1")
        _check(self.timesteps_per_micro_step >= 1, "train.timesteps_per_micro_step", "must be >= 1")
        _check(
            0 < self.timestep_fraction <= 1,
            "train.timestep_fraction",
            f"must be in (0, 1], got {self.timestep_fraction}",
        )
        _check(self.learning_rate > 0, "train.learning_rate", "must be > 0")
        _check(self.flow_learning_rate > 0, "train.flow_learning_rate", "must be > 0")
        _check(self.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0")
        _check_train_ranges(self)


@dataclass
class FlowConfig:
    block_out_channels: list[int] = _f([64, 128, 256, 256], "Channels of the flow network's encoder blocks.")
    layers_per_block: int = _f(1, "ResNet layers per encoder block.")
    attention_heads: int = _f(8, "Cross-attention heads per block (official: 8).")
    norm_num_groups: int = _f(32, "GroupNorm groups (must divide every block's channels).")
    architecture: Literal["official", "compact"] = _f(
        "official",
        "official (alignment/flow.py: cross-attention down blocks but a plain last one, every block downsampling, "
        "global average pool (AvgPool2d(4) on SD's 4x4 last map), Linear(C, 1) with PyTorch's default init) or "
        "compact (fastdag's first design: cross-attention in every block, no downsample after the last, "
        "GroupNorm + SiLU before a zero-initialised linear head, so log F starts at the beta*r term alone).",
    )

    def __post_init__(self) -> None:
        _check(len(self.block_out_channels) >= 1, "dag.flow.block_out_channels", "must list at least one block")
        _check(all(c >= 1 for c in self.block_out_channels), "dag.flow.block_out_channels",
               f"must be positive, got {self.block_out_channels}")
        for key in ("layers_per_block", "attention_heads", "norm_num_groups"):
            _check(getattr(self, key) >= 1, f"dag.flow.{key}", f"must be >= 1, got {getattr(self, key)}")
        for c in self.block_out_channels:
            _check(
                c % self.norm_num_groups == 0 and c % self.attention_heads == 0,
                "dag.flow.block_out_channels",
                f"{c} must be divisible by norm_num_groups={self.norm_num_groups} "
                f"and attention_heads={self.attention_heads}",
            )


@dataclass
class DagConfig:
    algorithm: Literal["db", "kl", "ddpo", "grpo"] = _f(
        "db",
        "Objective: db (DAG-DB, Eq. 8), kl (DAG-KL, Eq. 14), or a baseline: ddpo (DDPO, ddpo-pytorch) or grpo "
        "(flow_grpo / DanceGRPO on the DDIM-SDE sampler: group advantages over sample.group_size trajectories per "
        "prompt, PPO-clipped ratio, optional KL to the base model).",
    )
    beta: float = _f(100.0, "Final reward exponent beta: log R = beta * r (paper: 100).")
    beta_schedule: Literal["linear", "constant"] = _f(
        "linear", "linear: anneal beta from 0 over the first anneal_fraction of epochs; constant: beta always."
    )
    anneal_fraction: float = _f(0.5, "Fraction of epochs over which beta is annealed (paper: first half).")
    reduce: Literal["mean", "sum"] = _f(
        "mean",
        "Log-prob reduction over latent dims: mean (official code; beta then acts like beta*D) or sum "
        "(the true density).",
    )
    xhat_rewards: Literal["rollout", "recompute"] = _f(
        "rollout",
        "x̂_0 rewards of the forward-looking flow: rollout (scored once per state at sampling time) or "
        "recompute (the official per-transition recompute with the current model).",
    )
    xhat_overlap: bool = _f(
        False,
        "rollout x̂_0 rewards: decode and score each rollout batch's states on a side thread and CUDA stream while "
        "the next batch denoises (CUDA only; on a CPU, or while profiling, they run inline). Off by default until "
        "it has been measured on a GPU.",
    )
    xhat_states: Literal["all", "trained"] = _f(
        "trained",
        "rollout x̂_0 rewards: score only the states the update reads (the trained steps are drawn at rollout time; "
        "each trained step's state and its successor; with train.timestep_fraction = 1 that is every state) or "
        "all states. Same transitions, same loss either way.",
    )
    xhat_decoder: Optional[str] = _f(
        None,
        "rollout x̂_0 rewards: a diffusers AutoencoderTiny directory (e.g. TAESD) decoding the intermediate "
        "states instead of the VAE (cheaper, approximate); the final sample always uses the VAE. None: the VAE.",
    )
    kl_coef: Optional[float] = _f(None, "DAG-KL: coefficient of the KL-gradient term; None = the final beta.")
    ratio_clip: float = _f(1e-4, "DAG-KL/DDPO: PPO ratio clip epsilon (paper: 1e-4).")
    adv_clip: float = _f(5.0, "DAG-KL/DDPO: advantage clip.")
    prox_coef: float = _f(1.0, "Coefficient of the l2 proximal regulariser on the CFG noise prediction.")
    step_weighting: Literal["uniform", "score_scale"] = _f(
        "uniform",
        "Per-transition weight of the loss terms: uniform (the official code) or score_scale (divide step i's terms "
        "by |∂μ/∂ε̂| / σ_t, normalised to mean 1 over the steps, so the second-to-last step, whose log-prob "
        "gradient is ~7x the others', does not swamp the update). Positive weights keep DB's fixed point (δ = 0). "
        "Weighted losses run in PyTorch, not through the fused DB-loss kernel.",
    )
    rloo_scope: Literal["global", "rank"] = _f(
        "rank",
        "DAG-KL: the leave-one-out baseline over each process's share of the minibatch (rank: the official code, "
        "one baseline per GPU, no collective) or over the whole minibatch on all processes (global: N processes "
        "then train exactly as one would). The same on one process.",
    )
    rloo_normaliser: Literal["official", "loo_std", "pooled"] = _f(
        "official",
        "DAG-KL: the scale of the leave-one-out advantage (a_i - b_i), b_i the mean of the others at the same "
        "timestep. official (scripts/train_gfn.py): sqrt of the mean over j != i of (a_j - b_j)^2, per timestep; "
        "loo_std: the unbiased std of the others' a_j (fastdag's first choice; 6-10% larger advantages at B = 8, up "
        "to 49% at B = 4); pooled: one scale, the RMS of (a_j - b_j) over all the timesteps evaluated together "
        "(train.timesteps_per_micro_step; with 1 it is official's per timestep), so steps whose residuals spread "
        "more keep larger advantages (docs/results/2026-12-05-dag-kl.md).",
    )
    ddpo_advantages: Literal["per_prompt", "epoch"] = _f(
        "per_prompt",
        "DDPO: per_prompt (ddpo-pytorch's default: each prompt's rewards normalised by a buffer of its last "
        "stat_buffer rewards, kept across epochs; by the whole batch until it holds stat_min_count) or epoch "
        "(the whole epoch's mean and std).",
    )
    stat_buffer: int = _f(16, "DDPO per_prompt: rewards kept per prompt (ddpo-pytorch: 16).")
    stat_min_count: int = _f(16, "DDPO per_prompt: rewards a prompt needs before its own statistics are used (16).")
    grpo_std: Literal["group", "global", "none"] = _f(
        "group",
        "GRPO: divide each group's centred rewards by the group's std (group), the epoch's (global, flow_grpo's "
        "global_std) or nothing (none).",
    )
    grpo_kl_coef: float = _f(
        0.0,
        "GRPO: coefficient of the KL to the base model (LoRA off), mean((μ_θ − μ_ref)²) / (2σ²) per transition as "
        "flow_grpo (its configs: 0.04); 0 disables it and its extra forward.",
    )
    flow: FlowConfig = field(default_factory=FlowConfig)

    def __post_init__(self) -> None:
        _check(self.beta >= 0, "dag.beta", f"must be >= 0, got {self.beta}")
        _check(self.stat_buffer >= 1, "dag.stat_buffer", f"must be >= 1, got {self.stat_buffer}")
        _check(self.stat_min_count >= 1, "dag.stat_min_count", f"must be >= 1, got {self.stat_min_count}")
        _check(self.grpo_kl_coef >= 0, "dag.grpo_kl_coef", f"must be >= 0, got {self.grpo_kl_coef}")
        _check(0 < self.anneal_fraction <= 1, "dag.anneal_fraction", "must be in (0, 1]")
        _check(self.ratio_clip > 0, "dag.ratio_clip", "must be > 0")
        _check(self.adv_clip > 0, "dag.adv_clip", "must be > 0")
        _check(self.prox_coef >= 0, "dag.prox_coef", "must be >= 0")
        _check(self.kl_coef is None or self.kl_coef >= 0, "dag.kl_coef", f"must be >= 0 (or null), got {self.kl_coef}")

    @property
    def kl_coefficient(self) -> float:
        """The paper uses the final beta as the KL-gradient coefficient."""
        return self.beta if self.kl_coef is None else self.kl_coef


@dataclass
class RewardConfig:
    name: str = _f("jpeg_compressibility", "Reward function, by registered name (see `fastdag rewards`).")
    kwargs: dict[str, Any] = _f({}, "Keyword arguments passed to the reward's constructor.")
    batch_size: int = _f(32, "Images per reward call when scoring x̂_0 states.")

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "reward.batch_size", "must be >= 1")


@dataclass
class PromptsConfig:
    source: str = _f(
        "tiny",
        "A named prompt set (see `fastdag prompts`) or a file: .txt (one per line), .csv (column `column`), "
        ".json (a list, or an object {prompt: metadata}).",
    )
    column: str = _f("prompt", "CSV column holding the prompts (DrawBench: Prompts).")
    exclude_categories: list[str] = _f([], "CSV/JSON: drop prompts whose `category` metadata is listed.")

    def __post_init__(self) -> None:
        _check(self.source.strip() != "", "prompts.source", "is empty; give a named set or a prompt file")


@dataclass
class EvalConfig:
    prompts: Optional[str] = _f(
        None, "Held-out prompt set or file evaluated before training and after it (None: no evaluation)."
    )
    metric: Optional[str] = _f(
        None, "A registered metric reported beside the reward (shapes_judge, shapes_accuracy, clip_diversity)."
    )
    metric_kwargs: dict[str, Any] = _f({}, "Keyword arguments of the metric (clip_diversity: model, device).")
    samples_per_prompt: int = _f(4, "Images per evaluation prompt.")
    num_steps: Optional[int] = _f(None, "DDIM steps for evaluation; None = sample.num_steps.")
    guidance_scale: Optional[float] = _f(None, "CFG weight for evaluation; None = sample.guidance_scale.")
    eta: Optional[float] = _f(
        None, "DDIM eta (or the flow families' noise level) for evaluation; None = sample.eta (sample.noise_level)."
    )
    seed: int = _f(1234, "Seed of the evaluation noise: before and after use the same seeds.")
    grid_prompts: int = _f(8, "Prompts shown in the report's before/after grids.")

    def __post_init__(self) -> None:
        _check(self.samples_per_prompt >= 1, "eval.samples_per_prompt", "must be >= 1")
        _check(self.num_steps is None or self.num_steps >= 1, "eval.num_steps", "must be >= 1")
        _check(self.eta is None or 0 <= self.eta <= 1, "eval.eta", f"must be in [0, 1], got {self.eta}")
        _check(self.guidance_scale is None or self.guidance_scale >= 0, "eval.guidance_scale",
               f"must be >= 0, got {self.guidance_scale}")
        _check(0 <= self.seed <= MAX_SEED, "eval.seed", f"must be in [0, {MAX_SEED}], got {self.seed}")
        _check(self.grid_prompts >= 0, "eval.grid_prompts", f"must be >= 0, got {self.grid_prompts}")
        _check(self.prompts != "", "eval.prompts", "is empty; give a prompt set or file, or null for no evaluation")


@dataclass
class KernelsConfig:
    backend: Literal["auto", "triton", "reference"] = _f(
        "auto", "Step-math kernels: auto (Triton on CUDA, the PyTorch reference otherwise), triton, reference."
    )


@dataclass
class EngineConfig:
    backend: Literal["deepspeed", "torch"] = _f(
        "deepspeed", "Update engine: deepspeed (ZeRO via deepspeed.initialize) or torch (plain PyTorch AdamW)."
    )
    zero_stage: int = _f(0, "DeepSpeed ZeRO stage: 0, 1 or 2 (3 is refused: see docs/distributed.md).")
    optimizer: Literal["adamw", "adamw8bit"] = _f(
        "adamw", "adamw (torch) or adamw8bit (bitsandbytes 8-bit AdamW: the gpu extra, a CUDA device)."
    )

    def __post_init__(self) -> None:
        _check(self.zero_stage in (0, 1, 2, 3), "engine.zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")


@dataclass
class CheckpointConfig:
    every_n_epochs: int = _f(0, "Save a checkpoint every N epochs (0: only at the end).")
    save_final: bool = _f(True, "Save a checkpoint after the last epoch.")
    keep_last: int = _f(0, "Keep only the newest K complete checkpoints of the run (0: keep all).")

    def __post_init__(self) -> None:
        _check(self.every_n_epochs >= 0, "checkpoint.every_n_epochs", "must be >= 0")
        _check(self.keep_last >= 0, "checkpoint.keep_last", f"must be >= 0, got {self.keep_last}")


@dataclass
class LoggingConfig:
    output_dir: str = _f("runs", "Parent directory of run directories.")
    run_name: Optional[str] = _f(None, "Run directory name; None = <timestamp>-<algorithm>.")
    grid_size: int = _f(8, "Images in each epoch's sample grid (0 disables grids).")
    progress: bool = _f(True, "Show progress bars.")
    tracker: Literal["none", "tensorboard", "wandb"] = _f(
        "none",
        "Also send the config, metrics rows and sample grids to tensorboard (<run>/tensorboard) or wandb "
        "(WANDB_MODE=offline needs no network); both in the `tracking` extra.",
    )

    def __post_init__(self) -> None:
        _check(self.output_dir.strip() != "", "logging.output_dir", "is empty; give a directory")
        _check(self.run_name is None or _plain_name(self.run_name), "logging.run_name",
               f"must be one directory name (no '/', not '.' or '..', not empty), got {short_repr(self.run_name)}")
        _check(self.grid_size >= 0, "logging.grid_size", f"must be >= 0, got {self.grid_size}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dag: DagConfig = field(default_factory=DagConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        total = self.sample.batch_size * self.sample.num_batches_per_epoch
        _check(
            total % self.train.batch_size == 0,
            "train.batch_size",
            f"must divide the trajectories per epoch (sample.batch_size x sample.num_batches_per_epoch = {total}), "
            f"got {self.train.batch_size}",
        )
        minibatches = total // self.train.batch_size
        _check(
            minibatches % self.train.gradient_accumulation_steps == 0,
            "train.gradient_accumulation_steps",
            f"must divide the minibatches per epoch ({total} trajectories / train.batch_size {self.train.batch_size}"
            f" = {minibatches}), got {self.train.gradient_accumulation_steps}",
        )
        k = self.train.timesteps_per_micro_step
        _check(
            self.trained_timesteps % k == 0,
            "train.timesteps_per_micro_step",
            f"{k} does not divide the {self.trained_timesteps} trained timesteps (sample.num_steps x "
            f"train.timestep_fraction)",
        )
        _check(
            self.dag.algorithm != "grpo" or self.sample.group_size >= 2,
            "sample.group_size",
            f"GRPO compares the trajectories of a prompt's group: needs >= 2, got {self.sample.group_size}",
        )
        _check(
            self.dag.algorithm != "kl" or self.train.batch_size >= 3,
            "train.batch_size",
            "DAG-KL's leave-one-out baseline needs at least 3 samples per minibatch",
        )

    @property
    def trajectories_per_epoch(self) -> int:
        return self.sample.batch_size * self.sample.num_batches_per_epoch

    @property
    def trained_timesteps(self) -> int:
        """Transitions of each trajectory an epoch trains on."""
        return max(1, int(self.sample.num_steps * self.train.timestep_fraction))


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) if not isinstance(a, str) else a for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (ints are accepted for floats); return the typed value."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {short_repr(value)}")
    if tp is Any:
        return value
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: must be one of {_type_name(tp)}, got {short_repr(value)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise bad
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        (item_tp,) = typing.get_args(tp)[:1]
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 3e-4 as a string; accept what float() accepts
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        try:
            value = float(value)
        except OverflowError:  # an int beyond the float range
            raise ConfigError(f"{key}: must be a finite number, got {short_repr(value)}") from None
        if not math.isfinite(value):  # an inf or NaN setting only ever ends in a NaN run
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise ConfigError(f"{key}: unsupported field type {tp}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Instantiate dataclass ``cls`` from nested ``data`` over the defaults, checking keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {short_repr(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key; valid keys here: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, f"{prefix}{name}")
    return cls(**kwargs)


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "kwargs":
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _set_path(data: dict[str, Any], keys: list[str], value: Any) -> dict[str, Any]:
    """A copy of `data` with the dotted key set: only that leaf changes, so `reward.kwargs.a=1` then
    `reward.kwargs.b=2` keeps both (a free-form mapping is not replaced by a key inside it), while
    `reward.kwargs={a: 1}` replaces the mapping and `train={epochs: 2}` merges into the section."""
    out = dict(data)
    head = keys[0]
    if len(keys) > 1:
        out[head] = _set_path(out[head] if isinstance(out.get(head), dict) else {}, keys[1:], value)
    elif isinstance(value, dict) and isinstance(out.get(head), dict) and head != "kwargs":
        out[head] = _merge(out[head], value)
    else:
        out[head] = value
    return out


def _section_fields(cls: type, dotted: str) -> tuple[Any, str]:
    """The annotation of a dotted key, or ConfigError naming the valid keys at the first unknown part."""
    parts = dotted.split(".")
    tp: Any = cls
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(tp):
            if typing.get_origin(tp) is dict or tp is Any:  # free-form mapping such as reward.kwargs
                return Any, part
            raise ConfigError(f"{'.'.join(parts[:i])}: is not a section, cannot set {dotted}")
        hints = typing.get_type_hints(tp)
        if part not in hints:
            valid = ", ".join(f.name for f in dataclasses.fields(tp))
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: unknown key; valid keys here: {valid}")
        tp = hints[part]
    return tp, parts[-1]


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value parsed as YAML, so 3 is an int and [1, 2] a list)."""
    if "=" not in item:
        raise ConfigError(f"{short_repr(item)}: overrides look like key=value, e.g. train.epochs=2")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"{item}: empty key")
    _section_fields(Config, key)
    return key.split("."), parse_yaml_value(raw, key)


def parse_yaml_value(raw: str, key: str) -> Any:
    """A command-line value parsed as YAML (3 an int, [1, 2] a list), with the config file's limits; text that
    is not YAML stays text."""
    try:
        return yaml.load(raw, Loader=_StrictLoader) if raw.strip() else ""
    except ConfigError as e:
        raise ConfigError(f"{key}: {e}") from None
    except RecursionError:
        raise ConfigError(f"{key}: the value is nested too deeply") from None
    except yaml.YAMLError:
        return raw


class _StrictLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (PyYAML silently keeps the last) and a document
    whose aliases expand past MAX_YAML_NODES nodes (checked on the node graph, before anything is built)."""

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        return self.construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):
                continue  # PyYAML itself reports unhashable keys
            if key in seen:
                raise ConfigError(f"duplicate key {short_repr(key)} (line {key_node.start_mark.line + 1}); give each "
                                  "key once")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _check_expansion(root: yaml.Node) -> None:
    """Count the nodes of the document as its consumers would see it, every alias expanded (a shared node counted
    at each use), memoised per node so the count itself costs one pass over the graph; ConfigError past
    MAX_YAML_NODES or for an alias inside its own anchor (an infinitely deep value)."""
    def children(node: yaml.Node) -> list[yaml.Node]:
        if isinstance(node, yaml.MappingNode):
            return [n for pair in node.value for n in pair]
        return list(node.value) if isinstance(node, yaml.SequenceNode) else []

    expanded: dict[int, int] = {}
    path: set[int] = set()  # nodes whose subtree is being counted: the current depth-first path
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, counted = stack.pop()
        if counted:
            path.discard(id(node))
            total = 1 + sum(expanded[id(c)] for c in children(node))
            if total > MAX_YAML_NODES:
                raise ConfigError(f"YAML aliases expand the document past {MAX_YAML_NODES:,} values (line "
                                  f"{node.start_mark.line + 1}); a config needs far fewer")
            expanded[id(node)] = total
        elif id(node) in path:
            raise ConfigError(f"a YAML alias refers to its own anchor (line {node.start_mark.line + 1})")
        elif id(node) not in expanded:
            path.add(id(node))
            stack.append((node, True))
            stack += [(c, False) for c in children(node)]


def _read_yaml(path: Path) -> Any:
    """The YAML document in ``path``; a ConfigError for an unreadable, oversized, non-text or invalid file."""
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"--config: {path} is larger than {MAX_CONFIG_BYTES >> 20} MiB; a config is a few "
                              "kilobytes (is this the right file?)")
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"--config: {path} is not a text file (not UTF-8)") from None
    except OSError as e:
        raise ConfigError(f"--config: cannot read {path} ({e.strerror or e})") from None
    if "\0" in text:
        raise ConfigError(f"--config: {path} is not a text file (it holds NUL bytes)")
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except ConfigError as e:
        raise ConfigError(f"--config: {path}: {e}") from None
    except RecursionError:
        raise ConfigError(f"--config: {path} is nested too deeply") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--config: {path} is not valid YAML ({str(e).splitlines()[0]})") from None


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    """Defaults, then the YAML file at ``path``, then dotted ``key=value`` overrides; validated."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            if path.is_dir():
                raise ConfigError(f"--config: {str(path)!r} is a directory, not a YAML file")
            raise ConfigError(f"--config: no such file {str(path)!r}")
        loaded = _read_yaml(path)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"--config: {path} must hold a mapping of sections, got {type(loaded).__name__}")
        data = loaded or {}
    for item in overrides or []:
        keys, value = parse_override(item)
        data = _set_path(data, keys, value)
    try:
        return _build(Config, data)
    except TypeError as e:  # a section given a scalar, e.g. `train: 3`
        raise ConfigError(str(e)) from None


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def config_help(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """Rows (key, type, default, help) for every leaf field, for ``fastdag train --help``."""
    rows = []
    hints = typing.get_type_hints(cls)
    instance = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += config_help(tp, f"{prefix}{f.name}.")
        else:
            rows.append((f"{prefix}{f.name}", _type_name(tp), repr(getattr(instance, f.name)), f.metadata.get("help", "")))
    return rows


CONFIG_REFERENCE = "docs/config.md"  # written by `fastdag config-reference --out docs/config.md`; a test keeps it current


def _markdown_cell(text: str) -> str:
    """``text`` for a Markdown table cell: pipes escaped everywhere; outside code spans also ``*`` (``a*sqrt(..)*``
    would turn italic) and ``<`` (``<run>`` would read as an HTML tag)."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):  # even parts lie outside code spans
        parts[i] = parts[i].replace("\\", "\\\\").replace("*", "\\*").replace("<", "&lt;")
    return "`".join(parts).replace("|", "\\|")


def config_reference() -> str:
    """The config reference page (docs/config.md): every field of the tree with its type, default and doc, one
    table per section, from :func:`config_help` (what ``fastdag train --help`` prints)."""
    sections: dict[str, list[tuple[str, str, str, str]]] = {}
    for key, tp, default, help_text in config_help():
        sections.setdefault(key.rpartition(".")[0], []).append((key, tp, default, help_text))
    lines = [
        "# Config reference",
        "",
        "Generated from the config dataclasses in `fastdag/config.py` by `fastdag config-reference --out "
        "docs/config.md`; do not edit by hand (`tests/test_docs.py` fails when this page is stale). `fastdag train "
        "--help` prints the same fields.",
        "",
        "A run's config is these defaults, then the YAML file given with `--config` (any subset of the tree, nested "
        "as below), then dotted `key=value` overrides on the command line, e.g. `train.epochs=5` or "
        "`reward.kwargs={url: http://host:8765}`. Values are parsed as YAML. An unknown key, a wrong type or a value "
        "out of range stops with one line naming the key ([troubleshooting](troubleshooting.md)). The resolved "
        "config is saved as `config.yaml` in the run directory. How the settings fit together: "
        "[training](training.md).",
        "",
        "Sections: " + ", ".join(f"[{name}](#{name.replace('.', '')})" for name in sections) + ".",
    ]
    for name, rows in sections.items():
        lines += ["", f"## {name}", "", "| key | type | default | what it does |", "| --- | --- | --- | --- |"]
        for key, tp, default, help_text in rows:
            tp, default = tp.replace("|", "\\|"), default.replace("|", "\\|")  # code spans: pipes only
            lines.append(f"| `{key}` | `{tp}` | `{default}` | {_markdown_cell(help_text)} |")
    return "\n".join(lines) + "\n"
