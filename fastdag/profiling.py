"""Where an epoch's time goes: one phase timer shared by the trainer, ``fastdag profile`` and the benchmarks.

:class:`PhaseTimer` hands out named context managers (``with timer.phase("unet"): ...``) inside named stages
(``with timer.stage("rollout"): ...``). When it is off, both are one shared no-op context: the hot path gains no
host synchronisation and no clock reads. When it is on, the device is synchronised before every clock read so
asynchronous GPU work is charged to the phase that launched it. Phases are exclusive: a phase entered inside
another pauses the outer one. What a stage spends outside every phase is reported as ``host`` (Python,
indexing, allocation, copies, logging).

Phases: ``unet`` (UNet forwards), ``step`` (DDIM step / log-prob math), ``decode`` (VAE or cheap decoder),
``reward`` (reward calls), ``flow`` (flow-network forwards), ``backward`` (autograd through the UNet and the flow
network), ``optimizer`` (the engine's step), ``host`` (the rest).
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch

log = logging.getLogger(__name__)

PHASES = ("unet", "step", "decode", "reward", "flow", "backward", "optimizer", "host")
STAGES = ("rollout", "update")
PHASE_COLORS = {
    "unet": "#4C72B0", "step": "#55A868", "decode": "#C44E52", "reward": "#8172B2", "flow": "#CCB974",
    "backward": "#64B5CD", "optimizer": "#8C8C8C", "host": "#E5AE38",
}
_NULL = contextlib.nullcontext()


class PhaseTimer:
    """Exclusive wall time per (stage, phase). ``enabled=False`` makes every call a no-op (the default).

    ``seconds()`` returns ``{stage: {phase: seconds}}`` with ``host`` = the stage's wall time minus its phases.
    """

    def __init__(self, enabled: bool = False, device: Union[torch.device, str, None] = None):
        self.enabled = enabled
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.reset()

    def reset(self) -> None:
        self.totals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.stage_wall: dict[str, float] = defaultdict(float)
        self._stage: Optional[str] = None
        self._stack: list[list[Any]] = []  # [phase, start] of the phases entered, innermost last

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def phase(self, name: str):
        """Context manager charging its wall time to ``name`` within the current stage (no-op when off)."""
        return self._phase(name) if self.enabled else _NULL

    def stage(self, name: str):
        """Context manager opening stage ``name`` (``rollout`` or ``update``); no-op when off."""
        return self._stage_cm(name) if self.enabled else _NULL

    @contextlib.contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        now = self._now()
        stage = self._stage or "other"
        if self._stack:  # pause the enclosing phase
            outer = self._stack[-1]
            self.totals[stage][outer[0]] += now - outer[1]
        entry = [name, now]
        self._stack.append(entry)
        try:
            yield
        finally:
            now = self._now()
            self._stack.pop()
            self.totals[stage][name] += now - entry[1]
            if self._stack:
                self._stack[-1][1] = now

    @contextlib.contextmanager
    def _stage_cm(self, name: str) -> Iterator[None]:
        previous, self._stage = self._stage, name
        start = self._now()
        try:
            yield
        finally:
            self.stage_wall[name] += self._now() - start
            self._stage = previous

    def seconds(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for stage in list(self.stage_wall) + [s for s in self.totals if s not in self.stage_wall]:
            phases = {p: self.totals[stage].get(p, 0.0) for p in PHASES if p != "host"}
            phases.update({p: v for p, v in self.totals[stage].items() if p not in phases})
            wall = self.stage_wall.get(stage, sum(phases.values()))
            phases["host"] = max(0.0, wall - sum(phases.values()))
            out[stage] = phases
        return out


NULL_TIMER = PhaseTimer(enabled=False)


def format_table(breakdown: dict[str, dict[str, float]], title: str = "") -> str:
    """A Markdown table: one row per phase, seconds and share of each stage, plus the stage totals."""
    stages = [s for s in STAGES if s in breakdown] + [s for s in breakdown if s not in STAGES]
    phases = [p for p in PHASES if any(p in breakdown[s] for s in stages)]
    phases += sorted({p for s in stages for p in breakdown[s]} - set(phases))
    totals = {s: sum(breakdown[s].values()) for s in stages}
    grand = sum(totals.values()) or 1.0
    lines = [f"**{title}**", ""] if title else []
    header = "| phase | " + " | ".join(f"{s} s | {s} %" for s in stages) + " | epoch s | epoch % |"
    lines += [header, "|" + "---|" * (2 * len(stages) + 3)]
    for p in phases:
        cells = []
        for s in stages:
            v = breakdown[s].get(p, 0.0)
            cells.append(f"{v:.3f} | {100 * v / (totals[s] or 1.0):.1f}")
        total = sum(breakdown[s].get(p, 0.0) for s in stages)
        lines.append(f"| {p} | " + " | ".join(cells) + f" | {total:.3f} | {100 * total / grand:.1f} |")
    cells = [f"**{totals[s]:.3f}** | 100" for s in stages]
    lines.append("| **total** | " + " | ".join(cells) + f" | **{grand if totals else 0:.3f}** | 100 |")
    return "\n".join(lines)


def plot_breakdown(bars: dict[str, dict[str, dict[str, float]]], path: Union[str, Path], title: str = "") -> Path:
    """A stacked-bar PNG: one bar per (label, stage), stacked by phase. ``bars`` is ``{label: breakdown}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, columns = [], []
    for label, breakdown in bars.items():
        for stage in [s for s in STAGES if s in breakdown] + [s for s in breakdown if s not in STAGES]:
            names.append(f"{label}\n{stage}" if len(bars) > 1 else stage)
            columns.append(breakdown[stage])
    phases = [p for p in PHASES if any(c.get(p, 0.0) > 0 for c in columns)]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.4 * len(names) + 2.5), 4.5))
    bottoms = [0.0] * len(names)
    for p in phases:
        values = [c.get(p, 0.0) for c in columns]
        ax.bar(names, values, bottom=bottoms, label=p, color=PHASE_COLORS.get(p))
        bottoms = [b + v for b, v in zip(bottoms, values)]
    ax.set_ylabel("seconds")
    ax.set_title(title or "time per epoch by phase")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window: CUDA's allocator peak, or the process's RSS high-water mark (Linux)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # writing 5 to clear_refs resets VmHWM (Linux >= 4.0); elsewhere the peak covers the process lifetime
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_mib(device: torch.device) -> float:
    """CUDA ``max_memory_allocated`` on a GPU; the RSS high-water mark of this process on a CPU. MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def nvml_telemetry(device: Union[torch.device, str]) -> dict[str, float]:
    """Power, clocks, utilisation, memory and temperature of ``device`` from NVML, or ``{}`` when there is no
    GPU, no ``pynvml`` (package nvidia-ml-py) or NVML fails to initialise (it raises ``NVMLError`` without one)."""
    device = torch.device(device)
    if device.type != "cuda":
        return {}
    try:
        import pynvml
    except ImportError:
        log.info("pynvml not installed (pip install nvidia-ml-py): no GPU telemetry")
        return {}
    try:
        pynvml.nvmlInit()
    except Exception as e:  # pynvml.NVMLError and its subclasses; no driver, no GPU
        log.info("NVML unavailable (%s): no GPU telemetry", e)
        return {}
    try:
        index = device.index if device.index is not None else torch.cuda.current_device()
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        util = pynvml.nvmlDeviceGetUtilizationRates(h)
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        return {
            "nvml_power_w": pynvml.nvmlDeviceGetPowerUsage(h) / 1000,
            "nvml_power_limit_w": pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000,
            "nvml_sm_clock_mhz": float(pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM)),
            "nvml_mem_clock_mhz": float(pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM)),
            "nvml_gpu_util_pct": float(util.gpu),
            "nvml_mem_util_pct": float(util.memory),
            "nvml_mem_used_mib": mem.used / 2**20,
            "nvml_temperature_c": float(pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)),
        }
    except Exception as e:
        log.info("NVML query failed (%s): no GPU telemetry", e)
        return {}
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def profile_epoch(trainer, warmup: int = 0, beta: Optional[float] = None) -> dict[str, Any]:
    """Run ``warmup`` plain epochs, then one epoch of ``trainer`` with its phase timer on.

    Returns ``breakdown`` ({stage: {phase: seconds}}), ``table`` (Markdown),
    ``epoch_seconds``, ``trajectories``, ``transitions``, ``peak_memory_mib`` and ``hardware``.
    """
    from fastdag.objectives import beta_at

    cfg = trainer.cfg
    beta = beta_at(trainer.epoch, cfg.dag, cfg.train.epochs) if beta is None else beta
    for _ in range(warmup):
        trainer.train_epoch(trainer.sample_epoch(), beta)
    device = trainer.device
    trainer.timer = PhaseTimer(enabled=True, device=device)
    reset_peak_memory(device)
    try:
        trainer.train_epoch(trainer.sample_epoch(), beta)
        breakdown = trainer.timer.seconds()
    finally:
        trainer.timer = PhaseTimer(enabled=False, device=device)
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = f"CPU, {torch.get_num_threads()} threads"
    n = cfg.trajectories_per_epoch
    return {
        "breakdown": breakdown,
        "table": format_table(breakdown),
        "epoch_seconds": sum(sum(v.values()) for v in breakdown.values()),
        "trajectories": n,
        "transitions": n * trainer.num_train_steps * cfg.train.num_inner_epochs,
        "peak_memory_mib": peak_memory_mib(device),
        "hardware": hardware,
    }
