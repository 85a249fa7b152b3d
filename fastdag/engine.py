"""Update engines: DeepSpeed (ZeRO; its JSON generated from the config tree) or plain PyTorch AdamW.

Both take the trainable parameters in two groups (LoRA, flow) with their own learning rates and expose the
same calls: ``forward(fn)`` runs a micro-step's forward ``fn()`` (through DeepSpeed's engine, whose ZeRO
optimizers count micro-steps there), ``backward(loss)``, ``step()`` after each (it updates only at accumulation
boundaries), and ``save(dir)`` / ``load(dir)`` of everything the update needs to continue exactly: the trainable
weights and the optimizer state. ``accumulation`` counts micro-steps per optimizer step: minibatches times
trained timesteps, as the official code accumulates over both.

Data-parallel runs (N processes) use DeepSpeed: each process's micro-batch is its share of ``train.batch_size``
and DeepSpeed averages the gradients over the processes, so an optimizer step sees the same global batch as a
single process would.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from fastdag.config import Config, ConfigError
from fastdag.distributed import Shard, World
from fastdag.state_io import load_state, safe_torch_load, save_state

T = TypeVar("T")


def param_groups(lora_params: list[torch.nn.Parameter], flow_params: list[torch.nn.Parameter], cfg: Config) -> list[dict]:
    groups = [{"params": lora_params, "lr": cfg.train.learning_rate, "name": "lora"}]
    if flow_params:
        groups.append({"params": flow_params, "lr": cfg.train.flow_learning_rate, "name": "flow"})
    return groups


def check_engine(cfg: Config, device: torch.device, world: World) -> None:
    """Engine choices this machine and launch cannot run, as one-line ConfigErrors (before any model loads)."""
    if cfg.engine.backend == "torch" and world.size > 1:
        raise ConfigError(f"engine.backend: torch runs a single process, but {world.size} were launched; "
                          "use engine.backend=deepspeed for data-parallel training")
    if cfg.engine.zero_stage == 3:
        # Found with DeepSpeed 0.19 (docs/distributed.md): ZeRO-3 trains like stage 2 once forwards run through the
        # engine, but with parameters actually partitioned the LoRA/flow export and the weight digests read empty
        # partitions (they would need GatheredParameters), and the rank-0-only evaluation would wait forever on
        # the other ranks' all-gathers.
        raise ConfigError("engine.zero_stage: 3 is not supported: it partitions the LoRA and flow weights, which "
                          "the checkpoint export and the rank-0 evaluation read whole; use 1 or 2")
    if cfg.engine.optimizer == "adamw8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError("engine.optimizer: adamw8bit needs bitsandbytes, which is not installed "
                              "(pip install -e '.[gpu]' on a CUDA machine)") from None
        if device.type != "cuda" or not torch.cuda.is_available():
            raise ConfigError(f"engine.optimizer: adamw8bit needs a CUDA device, the model runs on {device}; "
                              "use adamw")


class GroupClipper:
    """Clips each parameter group's gradient (LoRA, flow) to its own norm before the optimizer updates it, as the
    official code clips the UNet and the flow network separately (``train.grad_clip: separate``), and records
    every group's pre-clip norm.

    An optimizer step pre-hook, so it runs wherever the update happens: in the torch engine, and inside DeepSpeed's
    step, after ZeRO 1/2 have reduced the gradients into each process's partition of a group (DeepSpeed calls the
    optimizer once per group there). With the gradients partitioned over processes (``partitioned``) the squared
    norms are summed over them first, so every process clips by the whole group's norm. The coefficient is
    torch.nn.utils.clip_grad_norm_'s: max_norm / (norm + 1e-6), at most 1. A group whose norm is not finite is
    not updated (its gradients are dropped; AdamW leaves it and its moments alone) and its norm is recorded as
    such, for the divergence guard (fastdag.divergence): one host sync per group and optimizer step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, max_norm: float, partitioned: bool):
        self.max_norm, self.partitioned = max_norm, partitioned
        self.norms: dict[str, torch.Tensor] = {}
        optimizer.register_step_pre_hook(self)

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for group in optimizer.param_groups:
            grads = [p.grad for p in group["params"] if p.grad is not None]
            device = group["params"][0].device
            sq = torch.zeros((), device=device)
            if grads:
                sq = torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum()
            if self.partitioned:
                torch.distributed.all_reduce(sq)
            norm = sq.sqrt()
            self.norms[group["name"]] = norm.detach()
            if not torch.isfinite(norm):
                for p in group["params"]:
                    p.grad = None
                continue
            if grads and self.max_norm > 0:
                torch._foreach_mul_(grads, (self.max_norm / (norm + 1e-6)).clamp(max=1.0))

    def total(self) -> torch.Tensor:
        """The pre-clip norm over all groups (what a joint clip would clip); on the device, no host sync."""
        return torch.stack(list(self.norms.values())).pow(2).sum().sqrt() if self.norms else torch.zeros(())


def drop_non_finite_step(params: list[torch.nn.Parameter], norm: torch.Tensor | None) -> bool:
    """Before an optimizer step: if the gradients' norm is not finite, drop the gradients (AdamW then leaves every
    parameter and its moments alone) and return True. One host sync per optimizer step (fastdag.divergence)."""
    if norm is None:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return False
        norm = torch.nn.utils.get_total_norm(grads)
    if torch.isfinite(norm):
        return False
    for p in params:
        p.grad = None
    return True


def make_optimizer(groups: list[dict], cfg: Config) -> torch.optim.Optimizer:
    t = cfg.train
    kwargs = dict(betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.adam_weight_decay, eps=t.adam_epsilon)
    if cfg.engine.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable weights (LoRA and flow) by name, on the CPU."""
    return {n: p.detach().cpu().clone() for n, p in module.named_parameters() if p.requires_grad}


class TorchEngine:
    STATE = "torch_engine"  # torch_engine.json + torch_engine.safetensors (fastdag.state_io: no pickle)

    def __init__(self, module: torch.nn.Module, groups: list[dict], cfg: Config, accumulation: int):
        self.module = module
        self.optimizer = make_optimizer(groups, cfg)
        self.params = [p for g in groups for p in g["params"]]
        self.accumulation, self.max_grad_norm = accumulation, cfg.train.max_grad_norm
        # train.grad_clip joint: one clip_grad_norm_ over both groups in step(); separate: the clipper hook
        self.clipper = None if cfg.train.grad_clip == "joint" else GroupClipper(self.optimizer, self.max_grad_norm,
                                                                                partitioned=False)
        self.micro_steps = 0
        self.grad_norm = torch.zeros(())

    def forward(self, fn: Callable[[], T]) -> T:
        return fn()

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()

    def step(self) -> bool:
        """Count a micro-step; update at an accumulation boundary. Returns whether it updated."""
        self.micro_steps += 1
        if self.micro_steps % self.accumulation:
            return False
        if self.clipper is not None:
            self.optimizer.step()  # the clipper clips each group, drops a non-finite one and records the norms
            self.grad_norm = self.clipper.total()
            self.optimizer.zero_grad(set_to_none=True)
            return True
        if self.max_grad_norm > 0:
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm).detach()
        if drop_non_finite_step(self.params, self.grad_norm if self.max_grad_norm > 0 else None):
            self.grad_norm = torch.tensor(float("nan"))  # the guard (fastdag.divergence) reads the drop from it
            return True
        if self.max_grad_norm == 0:
            self.grad_norm = torch.zeros(())  # not measured without clipping (and no longer a dropped step's NaN)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def save(self, directory: Path) -> None:
        """Single process (checked): one file with the trainable weights, the optimizer and the step count."""
        directory.mkdir(parents=True, exist_ok=True)
        save_state(directory / self.STATE, {"trainable": trainable_state(self.module),
                                             "optimizer": self.optimizer.state_dict(),
                                             "micro_steps": self.micro_steps, "grad_norm": self.grad_norm})

    def load(self, directory: Path) -> None:
        state = load_state(directory / self.STATE)
        params = dict(self.module.named_parameters())
        with torch.no_grad():
            for name, value in state["trainable"].items():
                params[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.micro_steps, self.grad_norm = state["micro_steps"], state["grad_norm"]


def deepspeed_config(cfg: Config, shard: Shard, world: World, bf16: bool) -> dict[str, Any]:
    """DeepSpeed JSON from the config tree and the data-parallel split, so batch sizes cannot disagree with it:
    per process a micro-batch of its share of ``train.batch_size``, accumulated over ``micro_steps_per_update``
    backwards; DeepSpeed checks train_batch_size = micro-batch x accumulation x processes. DeepSpeed clips one
    joint norm; with ``train.grad_clip: separate`` its clipping is off and :class:`GroupClipper` clips instead."""
    ds: dict[str, Any] = {
        "train_batch_size": shard.train_batch * shard.micro_steps_per_update * world.size,
        "train_micro_batch_size_per_gpu": shard.train_batch,
        "gradient_accumulation_steps": shard.micro_steps_per_update,
        "gradient_clipping": cfg.train.max_grad_norm if cfg.train.grad_clip == "joint" else 0.0,
        "zero_optimization": {"stage": cfg.engine.zero_stage},
        # the optimizer is ours (torch AdamW with two param groups): no CPU-Adam JIT build, ZeRO wraps it
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if bf16:
        ds["bf16"] = {"enabled": True}
    return ds


class DeepSpeedEngine:
    """``save``/``load`` go through DeepSpeed's own ``save_checkpoint``/``load_checkpoint`` (collective: every
    process writes its ZeRO partition of the optimizer state and fp32 weights; DeepSpeed checks the layout on
    load) rather than a state dict of the client optimizer, whose ZeRO-partitioned form differs by stage. Frozen
    base weights are left out: they come from ``model.pretrained``."""

    TAG = "deepspeed"

    def __init__(self, module: torch.nn.Module, groups: list[dict], cfg: Config, shard: Shard, world: World,
                 device: torch.device):
        import deepspeed

        from fastdag.distributed import ensure_env, init_local

        ensure_env()
        if not torch.distributed.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if world.size == 1:  # no launcher (or a launcher of one): nothing may listen on the network
                init_local(backend)
            else:
                deepspeed.init_distributed(dist_backend=backend)
        self.ds_config = deepspeed_config(cfg, shard, world, bf16=False)
        optimizer = make_optimizer(groups, cfg)
        self.clipper = None
        if cfg.train.grad_clip == "separate":
            self.clipper = GroupClipper(optimizer, cfg.train.max_grad_norm,
                                        partitioned=cfg.engine.zero_stage > 0 and world.size > 1)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer,
                                                                 config=self.ds_config)
        self.module = module
        self.accumulation = shard.micro_steps_per_update
        self.grad_norm = torch.zeros(())

    @property
    def micro_steps(self) -> int:
        return self.engine.micro_steps

    def forward(self, fn: Callable[[], T]) -> T:
        # DeepSpeed's forward does per-micro-step bookkeeping (ZeRO-3 starts a new gradient accumulation there:
        # called directly, the modules' gradients of earlier micro-steps were overwritten, not accumulated).
        return self.engine(fn)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself

    def step(self) -> bool:
        boundary = self.engine.is_gradient_accumulation_boundary()
        own = None
        if boundary and self.clipper is not None:
            # inside it the clipper clips each group, drops a non-finite one and records the pre-clip norms
            self.engine.step()
            self.grad_norm = self.clipper.total()
            return boundary
        if boundary and not self.engine.zero_optimization():
            # ZeRO stage 0 with our optimizer: DeepSpeed clips but records no norm (get_global_grad_norm is None),
            # so take the pre-clip norm of the full gradients here, as ZeRO 1/2 report it.
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            own = torch.nn.utils.get_total_norm(grads) if grads else None
            if own is not None and drop_non_finite_step(list(self.module.parameters()), own):
                own = torch.tensor(float("nan"))  # ZeRO 1/2 skip such a step themselves; stage 0 needs this
        self.engine.step()
        if boundary:
            norm = self.engine.get_global_grad_norm()
            norm = own if norm is None else norm
            if norm is not None:
                self.grad_norm = torch.as_tensor(norm, dtype=torch.float32)
        return boundary

    def save(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory), tag=self.TAG, client_state={"grad_norm": self.grad_norm},
                                    save_latest=False, exclude_frozen_parameters=True)

    def load(self, directory: Path) -> None:
        # DeepSpeed's files are pickles, which it reads with weights_only=False: read them with the allow-list.
        self.engine.checkpoint_engine.load = safe_torch_load
        path, client = self.engine.load_checkpoint(str(directory), tag=self.TAG, load_module_strict=False,
                                                   load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise ConfigError(f"train.resume: no DeepSpeed state in {directory}")
        # Checkpoints sit at optimizer-step boundaries; DeepSpeed restores global_steps but not micro_steps.
        self.engine.micro_steps = self.engine.global_steps * self.accumulation
        self.grad_norm = client["grad_norm"]


class TrainableModules(torch.nn.Module):
    """The modules the engines update: the UNet (frozen base + LoRA) and the flow network."""

    def __init__(self, unet: torch.nn.Module, flow: torch.nn.Module | None):
        super().__init__()
        self.unet = unet
        self.flow = flow

    def forward(self, fn: Callable[[], T]) -> T:
        """A micro-step's forward, composed by the trainer from calls into ``unet`` and ``flow``."""
        return fn()


def build_engine(cfg: Config, unet, flow, lora_params, flow_params, shard: Shard, world: World, device: torch.device):
    groups = param_groups(lora_params, flow_params, cfg)
    module = TrainableModules(unet, flow)
    if cfg.engine.backend == "deepspeed":
        return DeepSpeedEngine(module, groups, cfg, shard, world, device)
    return TorchEngine(module, groups, cfg, shard.micro_steps_per_update)
