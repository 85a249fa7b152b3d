"""Update engines: DeepSpeed (ZeRO; its JSON generated from the config tree) or plain PyTorch AdamW.

Both take the trainable parameters in two groups (LoRA, flow) with their own learning rates and expose the
same three calls: ``backward(loss)`` per micro-step, ``step()`` after each (it updates only at accumulation
boundaries), and ``state_dict()``. ``accumulation`` counts micro-steps per optimizer step: minibatches times
trained timesteps, as the official code accumulates over both.
"""
from __future__ import annotations

import os
import socket
from typing import Any

import torch

from fastdag.config import Config


def param_groups(lora_params: list[torch.nn.Parameter], flow_params: list[torch.nn.Parameter], cfg: Config) -> list[dict]:
    groups = [{"params": lora_params, "lr": cfg.train.learning_rate, "name": "lora"}]
    if flow_params:
        groups.append({"params": flow_params, "lr": cfg.train.flow_learning_rate, "name": "flow"})
    return groups


def make_optimizer(groups: list[dict], cfg: Config) -> torch.optim.Optimizer:
    t = cfg.train
    return torch.optim.AdamW(
        groups, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.adam_weight_decay, eps=t.adam_epsilon
    )


class TorchEngine:
    def __init__(self, groups: list[dict], cfg: Config, accumulation: int):
        self.optimizer = make_optimizer(groups, cfg)
        self.params = [p for g in groups for p in g["params"]]
        self.accumulation, self.max_grad_norm = accumulation, cfg.train.max_grad_norm
        self.micro_steps = 0
        self.grad_norm = torch.zeros(())

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()

    def step(self) -> bool:
        """Count a micro-step; update at an accumulation boundary. Returns whether it updated."""
        self.micro_steps += 1
        if self.micro_steps % self.accumulation:
            return False
        if self.max_grad_norm > 0:
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm).detach()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "micro_steps": self.micro_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.micro_steps = state["micro_steps"]


def deepspeed_config(cfg: Config, accumulation: int, bf16: bool) -> dict[str, Any]:
    """DeepSpeed JSON from the config tree, so batch sizes cannot disagree with it."""
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": cfg.train.max_grad_norm,
        "zero_optimization": {"stage": cfg.engine.zero_stage},
        # the optimizer is ours (torch AdamW with two param groups): no CPU-Adam JIT build, ZeRO wraps it
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if bf16:
        ds["bf16"] = {"enabled": True}
    return ds


def _ensure_single_process_env() -> None:
    """A plain ``python``/``fastdag train`` launch is a world of one: give torch.distributed what it needs."""
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)


class DeepSpeedEngine:
    def __init__(self, module: torch.nn.Module, groups: list[dict], cfg: Config, accumulation: int, device: torch.device):
        import deepspeed

        _ensure_single_process_env()
        if not torch.distributed.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
        self.ds_config = deepspeed_config(cfg, accumulation, bf16=False)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=make_optimizer(groups, cfg), config=self.ds_config
        )
        self.accumulation = accumulation
        self.grad_norm = torch.zeros(())

    @property
    def micro_steps(self) -> int:
        return self.engine.micro_steps

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself

    def step(self) -> bool:
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        if boundary:
            norm = self.engine.get_global_grad_norm()
            if norm is not None:
                self.grad_norm = torch.as_tensor(norm, dtype=torch.float32)
        return boundary

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "micro_steps": self.engine.micro_steps}


class TrainableModules(torch.nn.Module):
    """The modules DeepSpeed wraps: the UNet (frozen base + LoRA) and the flow network."""

    def __init__(self, unet: torch.nn.Module, flow: torch.nn.Module | None):
        super().__init__()
        self.unet = unet
        self.flow = flow


def build_engine(cfg: Config, unet, flow, lora_params, flow_params, accumulation: int, device: torch.device):
    groups = param_groups(lora_params, flow_params, cfg)
    if cfg.engine.backend == "deepspeed":
        return DeepSpeedEngine(TrainableModules(unet, flow), groups, cfg, accumulation, device)
    return TorchEngine(groups, cfg, accumulation)
