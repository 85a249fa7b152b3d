"""The data-parallel world: which process this is, how an epoch splits over the processes, and the collectives
the trainer needs (gather for logging, broadcast, barrier).

Launchers (``torchrun``, the ``deepspeed`` launcher, a DeepSpeed hostfile across nodes) set RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; a plain ``python``/``fastdag train`` launch is a world of one.

**How an epoch splits.** The user states global quantities: ``sample.batch_size`` trajectories per rollout batch
and ``train.batch_size`` trajectories per minibatch, over all processes. Global trajectory j belongs to rank
``j % world``: each rank takes rows ``rank::world`` of every rollout batch, so its local trajectory i is global
trajectory ``rank + world * i``. The prompts and the noise are drawn for the whole global batch on every rank
from generators that are identical on all ranks, and each rank keeps its rows: a trajectory depends on its global
index only, so a run on N processes samples exactly the trajectories of a run on one (the extra cost is drawing
the other ranks' Gaussian noise, negligible beside a UNet forward).
"""
from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from fastdag.config import Config, ConfigError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run's outputs (metrics, samples, report, the checkpoint's weights)."""
        return self.rank == 0

    @staticmethod
    def from_env() -> "World":
        def read(key: str, default: int) -> int:
            raw = os.environ.get(key, str(default))
            try:
                return int(raw)
            except ValueError:
                raise ConfigError(f"{key}: the launcher set a non-integer value {raw!r}") from None

        world = World(read("RANK", 0), read("WORLD_SIZE", 1), read("LOCAL_RANK", 0))
        if world.size < 1 or not 0 <= world.rank < world.size:
            raise ConfigError(f"RANK={world.rank}, WORLD_SIZE={world.size}: the rank must lie in [0, WORLD_SIZE)")
        return world


@dataclass(frozen=True)
class Shard:
    """This rank's share of an epoch (all per rank) and the optimizer step it contributes to."""

    rollout_batch: int  # trajectories per rollout batch
    train_batch: int  # trajectories per minibatch (the micro-batch of one backward)
    trajectories: int  # trajectories per epoch
    micro_steps_per_update: int  # backwards per optimizer step: accumulated minibatches x micro-steps per minibatch


def shard(cfg: Config, world: World, micro_steps_per_minibatch: int) -> Shard:
    """Per-rank quantities derived from the global config; a ConfigError when the globals do not split evenly."""
    w = world.size
    for key, value in (("sample.batch_size", cfg.sample.batch_size), ("train.batch_size", cfg.train.batch_size)):
        if value % w:
            raise ConfigError(f"{key}: {value} trajectories (global, over all processes) do not split over "
                              f"{w} processes; use a multiple of {w}")
    per_rank = cfg.train.batch_size // w
    if cfg.dag.algorithm == "kl" and cfg.dag.rloo_scope == "rank" and per_rank < 3:
        raise ConfigError(f"dag.rloo_scope: rank needs at least 3 samples per minibatch on each process, got "
                          f"{per_rank} (train.batch_size {cfg.train.batch_size} / {w} processes); use global")
    return Shard(
        rollout_batch=cfg.sample.batch_size // w,
        train_batch=per_rank,
        trajectories=cfg.trajectories_per_epoch // w,
        micro_steps_per_update=cfg.train.gradient_accumulation_steps * micro_steps_per_minibatch,
    )


def ensure_env() -> None:
    """A plain launch is a world of one: give torch.distributed the variables a launcher would have set."""
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)


def init_local(backend: str) -> None:
    """A process group of one that listens on no network interface: an in-memory store instead of the TCPStore
    server (which binds every interface, ``*:MASTER_PORT``), and gloo/NCCL sockets on the loopback device unless
    the user chose an interface. A world of one has no peer to reach."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def active() -> bool:
    """Whether collectives are needed: a process group with more than one member."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_trajectory_values(local: torch.Tensor) -> torch.Tensor:
    """Per-trajectory values [n, ...] of every rank -> [world * n, ...] in global trajectory order (rank + world*i),
    the order a single process would hold them in. Equal ``n`` on every rank (the epoch splits evenly)."""
    if not active():
        return local
    return torch.stack(_all_gather(local), dim=1).reshape(-1, *local.shape[1:])


def gather_rows(local: torch.Tensor) -> tuple[torch.Tensor, slice]:
    """[b] from every rank -> ([world * b] concatenated by rank, the slice holding this rank's rows)."""
    if not active():
        return local, slice(0, local.shape[0])
    b, r = local.shape[0], dist.get_rank()
    return torch.cat(_all_gather(local)), slice(r * b, (r + 1) * b)


def _all_gather(local: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``local`` (same shape on all), in rank order."""
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local.contiguous())
    return parts


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    if not active():
        return values
    out = values.clone()
    dist.all_reduce(out)
    return out / dist.get_world_size()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if active():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        ds_comm = sys.modules.get("deepspeed.comm.comm")
        if ds_comm is not None and ds_comm.cdb is not None:
            # through DeepSpeed, which then drops the groups it cached from this process group (a later run in the
            # same process would otherwise reach them: "Group ... is not registered")
            ds_comm.destroy_process_group()
        else:
            dist.destroy_process_group()
