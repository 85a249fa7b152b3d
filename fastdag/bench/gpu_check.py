"""``fastdag bench gpu-check``: everything that needs a GPU, in one command that fits a lent machine's lease.

    fastdag bench gpu-check --prepare-wheels     # on a CPU machine with PyPI: .whl/ (what the GPU image lacks)
    fastdag bench gpu-check --dry-run            # the plan, limits and sizes; needs no GPU, imports nothing carried
    fastdag bench gpu-check --rehearse --out D   # every stage's code path on this CPU, tiny presets
    python3 -m fastdag.bench gpu-check --out "$OUT" --git-revision REV   # on one CUDA GPU, in at most 8 minutes

The lent machine (DESIGN.md §6): 15 minutes in all, start-up included, at most 10 per command, offline, and only
what the command writes under ``$OUT`` comes back (at most 8 files). So:

- **Install first, then plan.** The first stage pip-installs the wheels carried in ``.whl/`` (``--no-deps``, into a
  side directory put first on the path of every later stage) and records what imports; only then is anything
  carried (diffusers, peft, deepspeed, bitsandbytes) imported. A stage whose packages do not import is skipped
  with the reason.
- **Everything finished so far is already in ``--out``.** Each stage runs in its own process session; every result
  row is appended to ``gpu_check.csv`` the moment it is measured, the running stage's output goes to ``stage.log``,
  and when a stage ends its whole log is appended to ``gpu_check.log`` and ``gpu_check.md`` (the summary) is
  rewritten. A kill at any moment leaves all of that. Files (6 at most, all small): ``gpu_check.csv``,
  ``gpu_check.md``, ``gpu_check.log``, ``stage.log`` (only while a stage runs, or after a kill), ``throughput.csv``
  and ``kernels.csv`` (the throughput and kernel suites' own rows: ``fastdag bench report`` draws from them).
- **A budget that fits.** Stages run in order of value; each has a time limit (``--limit NAME=SECONDS`` overrides
  it) after which its whole process group is killed; a stage that would pass the whole budget (``--budget``, 480 s)
  runs with what is left if that is at least half its limit, else it is skipped. If the parent dies, each stage
  notices within a second and kills its own group.

Stages, by value (limits: see :data:`STAGES` and ``docs/results/2026-12-05-gpu-check-rehearsal.md``):

==============  ===================================================================================================
``install``     pip-installs ``.whl/``; which carried packages import, at which version (a carried pin that the
                image's own package shadows fails)
``throughput``  P2–P4: the throughput suite's rows for the fastdag and the official-cost mode (one warm-up epoch,
                FLOP-counted, then one timed epoch each), rollout ÷ UNet-only forward, MFU
``bandwidth``   P5: the fused DDIM step kernel (forward, forward+backward) against eager PyTorch and a plain copy
``kernels``     the kernel tests under compiled Triton (``TRITON_INTERPRET=0``, CUDA tensors), pytest-xdist
``epochs``      one DAG-DB and one DAG-KL epoch in bf16, DeepSpeed ZeRO-2: seconds, peak memory, finite losses
``graphs``      eager vs CUDA-graph denoising at batch 1 and 8
``attention``   SDPA's backends at SD 1.5's largest self-attention; whether xformers loads (and, if it does, a
                rollout with it)
``adamw8bit``   bitsandbytes' 8-bit AdamW: one optimizer step, then one tiny-preset epoch through the trainer
``nvml``        NVML telemetry idle and under a matmul load: power, clocks, temperature, throttle reasons
==============  ===================================================================================================

``--rehearse`` runs the same stages on the CPU with the tiny presets (CUDA-only parts skip with their reason):
proof that every stage starts, writes its rows and respects its limit. Without CUDA (and without ``--dry-run`` or
``--rehearse``) the check exits 2 with one line.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import fnmatch
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from fastdag.bench import harness

WHEELS = harness.REPO_ROOT / ".whl"
GPU_LOCK = harness.REPO_ROOT / "requirements-gpu.lock"
SITE = Path(tempfile.gettempdir()) / "fastdag-gpu-check-site"
DEFAULT_OUT = harness.RESULTS_DIR / "gpu_check"
CSV_NAME, SUMMARY_NAME, LOG_NAME, LIVE_NAME = "gpu_check.csv", "gpu_check.md", "gpu_check.log", "stage.log"
THROUGHPUT_NAME, KERNELS_NAME = "throughput.csv", "kernels.csv"
LOG_HEAD, LOG_TAIL = 16_000, 64_000  # bytes of each stage's log kept in gpu_check.log (all of it when shorter)
FIELDS = ("timestamp", "git_revision", "hardware", "driver", "torch_version", "triton_version", "transformers_version",
          "diffusers_version", "peft_version", "deepspeed_version", "bitsandbytes_version", "run_id", "stage",
          "status", "metric", "value", "unit", "note")
MARK = "GPU_CHECK_RESULT "
BUDGET_SECONDS = 480  # the whole check, installs included (a lent machine's lease is 15 minutes, start-up included)
MIN_FRACTION = 0.5  # a stage runs on what is left of the budget only if that is at least this much of its limit
# What a stage child learns from its parent.
OUT_ENV, RUN_ID_ENV, PARENT_ENV = "GPU_CHECK_OUT", "GPU_CHECK_RUN_ID", "GPU_CHECK_PARENT"
IMAGE_PYTHON = (3, 12)  # the GPU image's CPython: the carried wheels are for it (manylinux x86-64)
PLATFORMS = [a for tag in ("manylinux_2_28", "manylinux_2_24", "manylinux_2_17", "manylinux2014")
             for a in ("--platform", f"{tag}_x86_64")]
IMPORTS = ("diffusers", "peft", "deepspeed", "bitsandbytes", "pynvml", "triton", "transformers")
DISTRIBUTIONS = {"pynvml": "nvidia-ml-py"}  # import name -> distribution name, where they differ


def carried_pins(lock: Path = GPU_LOCK) -> list[str]:
    """The ``name==version`` lines of the GPU lock, comments stripped (``# stripped``: carried with only the native
    libraries :data:`STRIP` keeps)."""
    return [line.partition("#")[0].strip() for line in lock.read_text().splitlines() if line.partition("#")[0].strip()]


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# Carried wheels cut down to this machine: a member of a wheel named here is kept only if the predicate says so.
# bitsandbytes ships one native library per CUDA/ROCm/XPU version (43 MB); the image is CUDA 13.0, and the CPU
# library is its fallback (3.6 MB left).
STRIP: dict[str, Callable[[str], bool]] = {
    "bitsandbytes": lambda member: not re.search(r"libbitsandbytes_\w+\.(so|dll|dylib)$", member)
    or bool(re.search(r"libbitsandbytes_(cuda130|cpu)\.so$", member)),
}

# Model sizes. The check's stages build their trainers from these overrides (and the throughput suite's presets of
# the same name); the sd35m stage uses the suite's "sd35m" preset (SD3.5 Medium, initialised on the GPU).
SIZES = {
    "sd15": ["model.pretrained=sd15-random", "model.dtype=bfloat16", "sample.num_steps=50", "sample.batch_size=8",
             "train.batch_size=8"],
    "tiny": ["model.pretrained=tiny-random", "sample.num_steps=10", "sample.batch_size=8", "train.batch_size=4",
             "dag.flow.block_out_channels=[32,64]", "dag.flow.norm_num_groups=8"],
}
# The CPU rehearsal's trainers are smaller still: it proves the code paths, the rows and the limits, in seconds.
REHEARSAL = ["sample.num_steps=4", "sample.batch_size=4", "train.batch_size=4", "train.timesteps_per_micro_step=4"]
EPOCH = ["sample.num_batches_per_epoch=1", "train.gradient_accumulation_steps=1", "train.epochs=1",
         "reward.name=jpeg_compressibility", "prompts.source=tiny", "logging.progress=false", "logging.grid_size=0",
         "checkpoint.save_final=false", "dag.beta_schedule=constant"]


@dataclass(frozen=True)
class Context:
    """What a stage child is told: the model size, whether this is the CPU rehearsal, where results go."""

    preset: str
    rehearse: bool
    out: Optional[Path]

    @property
    def overrides(self) -> list[str]:
        """Appended to every trainer's config: the rehearsal's smaller sizes (none on a GPU)."""
        return list(REHEARSAL) if self.rehearse else []

    @property
    def device(self) -> str:
        import torch

        return "cuda" if torch.cuda.is_available() and not self.rehearse else "cpu"


_STAGE = ""  # the stage this child process runs
_ENV: Optional[dict[str, str]] = None


def _attempt(fn: Callable[[], Any], default: str = "unknown") -> str:
    """``str(fn())``, or ``default (the error's type)``: the environment columns must never cost the results."""
    try:
        value = fn()
        return default if value is None else str(value)
    except Exception as e:  # anything: a broken driver, a package that fails on import, a missing git
        return f"{default} ({type(e).__name__})"


def _version(module: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(DISTRIBUTIONS.get(module, module))
    except metadata.PackageNotFoundError:
        return "none"


def _nvml(query: Callable[[Any], Any]) -> Any:
    import pynvml

    pynvml.nvmlInit()
    try:
        return query(pynvml)
    finally:
        pynvml.nvmlShutdown()


def _hardware(cuda_context: bool) -> str:
    """The GPU's name (from NVML; from CUDA only in a child, where a CUDA context costs nothing extra) or the CPU's."""
    import torch

    if not torch.cuda.is_available():
        return harness.hardware_name("cpu")
    try:
        name = _nvml(lambda nv: nv.nvmlDeviceGetName(nv.nvmlDeviceGetHandleByIndex(0)))
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:
        return torch.cuda.get_device_name(0) if cuda_context else "CUDA GPU"


def _environment(cuda_context: bool = False) -> dict[str, str]:
    """The columns every row of this process carries. Robust to anything: each one that fails reads ``unknown``."""
    env = {"git_revision": _attempt(harness.git_revision), "hardware": _attempt(lambda: _hardware(cuda_context))}
    env["driver"] = _attempt(lambda: _nvml(lambda nv: nv.nvmlSystemGetDriverVersion()), "none")
    for module in ("torch", "triton", "transformers", "diffusers", "peft", "deepspeed", "bitsandbytes"):
        env[f"{module}_version"] = _attempt(lambda: _version(module))
    return env


def _timestamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def append_result(out: Path, env: dict[str, str], run_id: str, stage: str, row: dict[str, Any]) -> None:
    cells = {k: row.get(k, "") for k in ("status", "metric", "value", "unit", "note")}
    harness.append_rows(out / CSV_NAME, [{**env, "timestamp": _timestamp(), "run_id": run_id, "stage": stage,
                                          **cells}], FIELDS)


def emit(metric: str, value: Any, unit: str = "", note: str = "", status: str = "ok") -> None:
    """One result: printed (a line after MARK, for the log) and appended to ``gpu_check.csv`` at once."""
    global _ENV
    row = {"metric": metric, "value": value, "unit": unit, "note": note, "status": status}
    print(MARK + json.dumps(row), flush=True)
    out = os.environ.get(OUT_ENV)
    if out:
        if _ENV is None:
            _ENV = _environment(cuda_context=True)
        append_result(Path(out), _ENV, os.environ.get(RUN_ID_ENV, ""), _STAGE, row)


def _watch_parent(parent: int) -> None:
    """Kill this stage's whole process group if the parent dies (a SIGKILL leaves no chance to clean up)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.killpg(os.getpgid(0), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True, name="gpu-check-parent-watch").start()


def _trainer(preset: str, extra: Sequence[str], out: str):
    from fastdag.config import load_config
    from fastdag.trainer import Trainer

    cfg = load_config(None, [*SIZES[preset], *EPOCH, *extra, f"logging.output_dir={out}"])
    return Trainer(cfg)


def _epoch_stage(preset: str, extra: Sequence[str], prefix: str = "") -> None:
    """Build a trainer, run one epoch (``fit``), report seconds, peak memory, the losses and whether all are finite."""
    import torch

    from fastdag.profiling import nvml_telemetry, peak_memory_mib, reset_peak_memory

    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        trainer = _trainer(preset, extra, out)
        emit(prefix + "build_seconds", round(time.perf_counter() - t0, 2), "s")
        reset_peak_memory(trainer.device)
        t0 = time.perf_counter()
        row = trainer.fit()[0]
        emit(prefix + "epoch_seconds", round(time.perf_counter() - t0, 2), "s",
             note="the first epoch: warm-up included")
        emit(prefix + "peak_memory", round(peak_memory_mib(trainer.device), 1), "MiB")
        for key in ("rollout_seconds", "update_seconds"):
            emit(prefix + key, round(row[key], 3), "s")
        finite = all(math.isfinite(float(v)) for k, v in row.items() if k != "epoch" and isinstance(v, (int, float)))
        for key in ("loss", "db_loss", "kl_loss", "reward_mean", "grad_norm_lora", "grad_norm_flow",
                    "logp_mismatch_max"):
            if key in row:
                emit(prefix + key, row[key])
        emit(prefix + "finite", finite, status="ok" if finite else "failed")
        for key, value in nvml_telemetry(trainer.device).items():
            emit(prefix + key, value)
        del trainer
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _install_stage(ctx: Context) -> None:
    """Install the carried wheels (if any), then import each package the stages need and report its version; where a
    wheel was carried, the version that imports must be the carried one."""
    other = sys.version_info[:2] != IMAGE_PYTHON  # a rehearsal on another Python: check pip's install, use none
    t0 = time.perf_counter()
    installed, note = install_carried(WHEELS, SITE.with_name(SITE.name + "-for-image") if other else SITE, other)
    if installed is None:
        emit("pip_install", False, note=note, status="failed")
    elif installed and other:
        emit("pip_install_for_image_seconds", round(time.perf_counter() - t0, 1), "s",
             note=f"{note}; for CPython 3.12, not importable by this Python {sys.version.split()[0]}: not used")
    elif installed:
        emit("pip_install_seconds", round(time.perf_counter() - t0, 1), "s", note=note)
    else:
        emit("pip_install", 0, note=note, status="skipped")
    carried = {_normalise(p.split("==")[0]): p.split("==")[1] for p in carried_pins()}
    wheel_names = {_normalise(w.name.split("-")[0]) for w in WHEELS.glob("*.whl")} if installed and not other else set()
    for module in IMPORTS:
        try:
            imported = __import__(module)
        except Exception as e:  # ImportError, or a build that fails on this machine
            emit(f"have_{module}", False, note=f"{type(e).__name__}: {str(e)[:160]}", status="skipped")
            continue
        version = str(getattr(imported, "__version__", "") or _version(module))  # what imported, not what is listed
        pinned = carried.get(_normalise(DISTRIBUTIONS.get(module, module)))
        shadowed = pinned is not None and module in wheel_names and version != pinned
        emit(f"have_{module}", True, note=f"{version}" + (f", carried {pinned} is shadowed" if shadowed else ""),
             status="failed" if shadowed else "ok")


def _throughput_stage(ctx: Context) -> None:
    """P2–P4 on the throughput suite: fastdag vs official-cost mode, one FLOP-counted warm-up and one timed epoch each
    (no profiled epoch, no CUDA-graph sweep: the graphs stage has it), rows as soon as computed."""
    from fastdag.bench import throughput

    def on_row(row: dict[str, Any]) -> None:
        emit(f"{row['mode']}.{row['metric']}", float(row["value"]), row["unit"])

    def on_epoch(mode: str, epoch: int, rollout_s: float, update_s: float) -> None:  # kept if the stage is cut short
        emit(f"{mode}.epoch{epoch}.seconds", round(rollout_s + update_s, 3), "s",
             note=f"rollout {rollout_s:.3f} s, update {update_s:.3f} s" + (", warm-up (FLOP-counted)" if epoch == 0
                                                                           else ""))

    with tempfile.TemporaryDirectory() as tmp:  # run directories stay out of --out (8 files come back, no more)
        results = (ctx.out or Path(tmp)) / THROUGHPUT_NAME
        throughput.run([ctx.preset, "--epochs", "1", "--repeat", "3", "--modes", "fastdag", "official",
                        "--graph-batches", "--no-profile", "--flops-in-warmup", "--results", str(results),
                        f"logging.output_dir={tmp}", *ctx.overrides], on_row=on_row, on_epoch=on_epoch)


def _sd35m_stage(ctx: Context) -> None:
    """P2-P4 on the flow-matching family at SD3.5 Medium's size (random weights initialised on the GPU, Flow-GRPO's
    512 px and 10 SDE steps): fastdag vs official-cost epochs, rollout / transformer-only forward, MFU. The rehearsal
    runs the tiny sd3 preset."""
    from fastdag.bench import throughput

    def on_row(row: dict[str, Any]) -> None:
        emit(f"{row['mode']}.{row['metric']}", float(row["value"]), row["unit"])

    with tempfile.TemporaryDirectory() as tmp:
        results = (ctx.out or Path(tmp)) / THROUGHPUT_NAME
        throughput.run(["tiny-sd3" if ctx.rehearse else "sd35m", "--epochs", "1", "--repeat", "3", "--modes",
                        "fastdag", "official", "--graph-batches", "--no-profile", "--flops-in-warmup", "--results",
                        str(results), f"logging.output_dir={tmp}", *ctx.overrides], on_row=on_row)


def _bandwidth_stage(ctx: Context) -> None:
    """P5: the fused DDIM step (bf16, SD 1.5's 4×64×64 latents) vs its eager PyTorch reference and a device copy."""
    from fastdag.bench import bench_kernels

    results = (ctx.out or Path(tempfile.mkdtemp())) / KERNELS_NAME
    size = (["--batch-sizes", "2", "--shape", "4", "16", "16", "--copy-mib", "16", "--warmup", "1", "--repeat", "3"]
            if ctx.rehearse else ["--batch-sizes", "8", "32", "--warmup", "5", "--repeat", "20"])
    rows = bench_kernels.main([*size, "--backward", "--no-compile", "--device", ctx.device, "--results", str(results)])
    emit("copy_gbps", float(rows[0]["copy_gbps"]), "GB/s", note="device copy, bytes read + written")
    ms = {}
    for r in rows:
        key = f"{r['mode']}.b{r['x_value']}"
        ms[r["provider"], key] = float(r["median_ms"])
        emit(f"{r['provider']}.{key}.gbps", float(r["gbps"]), "GB/s",
             note=f"{r['median_ms']} ms, {float(r['frac_of_copy_bw']):.1%} of copy")
    for (provider, key), value in ms.items():
        if provider == "triton" and ("reference", key) in ms:
            emit(f"triton_speedup_over_eager.{key}", round(ms["reference", key] / value, 3), "x")
    if not any(provider == "triton" for provider, _ in ms):
        emit("triton", "", note="the Triton path needs a GPU: eager reference and copy only", status="skipped")


def _kernels_stage(ctx: Context) -> None:
    """The kernel tests: compiled Triton on CUDA tensors (on the CPU rehearsal: the interpreter)."""
    # every kernel file's tests (test_kernels_compile's ahead-of-time sm_90 build is what running them does here)
    tests = sorted(f"tests/{p.name}" for p in (harness.REPO_ROOT / "tests").glob("test_kernels_*.py")
                   if p.name != "test_kernels_compile.py")
    try:
        import diffusers  # noqa: F401  (test_ddim_settings compares against DDIMScheduler)

        tests.append("tests/test_ddim_settings.py")
    except ImportError as e:
        emit("test_ddim_settings", "", note=f"not run: {e}", status="skipped")
    env = {**os.environ, "TRITON_INTERPRET": "1" if ctx.rehearse else "0"}
    workers: list[str] = []
    try:
        import xdist  # noqa: F401

        workers = ["-n", str(max(1, min(8, (os.cpu_count() or 2) - 1)))] if not ctx.rehearse else []
    except ImportError:
        pass
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *workers, *tests],
                            cwd=harness.REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = ""
    for line in proc.stdout:  # type: ignore[union-attr]  (tee into this stage's log as it comes)
        sys.stdout.write(line)
        if line.strip():
            last = line.strip()
    code = proc.wait()
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", last)}
    for key in ("passed", "failed", "skipped"):
        emit(f"kernel_tests_{key}", counts.get(key, 0))
    ran = counts.get("passed", 0) > 0
    emit("kernel_tests", last.strip("= "), status="ok" if code == 0 and ran else "failed",
         note=f"{'interpreter' if ctx.rehearse else 'compiled Triton'}, {len(tests)} files")


def _epochs_stage(ctx: Context) -> None:
    """One DAG-DB and one DAG-KL epoch in bf16 through DeepSpeed ZeRO-2; one failing does not stop the other."""
    import gc

    for algorithm in ("db", "kl"):
        try:
            _epoch_stage(ctx.preset, [f"dag.algorithm={algorithm}", "model.dtype=bfloat16", "engine.backend=deepspeed",
                                      "engine.zero_stage=2", *ctx.overrides], prefix=f"{algorithm}.")
        except Exception as e:
            traceback.print_exc()
            emit(f"{algorithm}.error", "", note=f"{type(e).__name__}: {str(e)[:240]}", status="failed")
        gc.collect()


def _graphs_stage(ctx: Context) -> None:
    """Eager vs CUDA-graph denoising rate at batch 1 and the preset's batch, 8 (one trainer; on a CPU, eager only)."""
    from fastdag.bench import throughput
    from fastdag.config import load_config
    from fastdag.trainer import Trainer

    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(load_config(None, [*throughput.PRESETS[ctx.preset]["overrides"], *ctx.overrides,
                                             f"logging.output_dir={out}"]))
        rates: dict[tuple[str, str], float] = {}

        def add(mode: str, metric: str, value: float, unit: str) -> None:
            rates[mode, metric] = value
            emit(f"{mode}.{metric}", round(value, 4), unit)
            if mode == "cuda_graphs" and ("eager", metric) in rates:
                emit(f"graphs_speedup.{metric.rsplit('.', 1)[-1]}", round(value / rates["eager", metric], 3), "x")

        throughput.graph_sweep(trainer, [1, trainer.cfg.sample.batch_size], repeat=3, add=add)
        if trainer.device.type != "cuda":
            emit("cuda_graphs", "", note="CUDA graphs need a GPU: eager rates only", status="skipped")


def _xformers_loads(device: str) -> str:
    """'' if xformers' memory-efficient attention runs here, else why not (an import is not enough: DESIGN.md §6)."""
    try:
        import torch
        import xformers.ops

        q = torch.randn(1, 16, 2, 8, device=device, dtype=torch.float16 if device == "cuda" else torch.float32)
        xformers.ops.memory_efficient_attention(q, q, q)
        return ""
    except Exception as e:
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"


def _attention_stage(ctx: Context) -> None:
    """SDPA's backends at SD 1.5's largest self-attention (CFG batch 16, 8 heads, 64×64 tokens, head dim 40); whether
    xformers runs, and only if it does, a rollout with it against SDPA."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device = ctx.device
    why = _xformers_loads(device)
    emit("xformers", not why, note=why or "memory_efficient_attention ran", status="skipped" if why else "ok")
    shape, dtype = ((2, 8, 256, 40), torch.float32) if ctx.rehearse else ((16, 8, 4096, 40), torch.bfloat16)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.MATH):
        name = backend.name.lower()
        try:
            with sdpa_kernel([backend]):
                timing = harness.time_fn(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), device,
                                         warmup=3, repeat=10, flush_bytes=0)
            emit(f"sdpa_ms.{name}", round(timing.median_ms, 4), "ms", note=f"{tuple(shape)} {str(dtype)[6:]}")
        except Exception as e:  # a backend this device or dtype does not support
            emit(f"sdpa_ms.{name}", "", note=f"{type(e).__name__}: {str(e).strip()[:120]}", status="skipped")
    if why:
        return
    from fastdag.bench.throughput import rollout_batch_seconds

    for backend in ("sdpa", "xformers"):
        with tempfile.TemporaryDirectory() as out:
            trainer = _trainer(ctx.preset, [f"model.attention={backend}", *ctx.overrides], out)
            seconds = rollout_batch_seconds(trainer, trainer.cfg.sample.batch_size, cuda_graphs=False, warmup=1,
                                            repeat=3)
            emit(f"rollout_seconds.{trainer.model.attention}", round(seconds, 4), "s")
            del trainer


def _adamw8bit_stage(ctx: Context) -> None:
    """bitsandbytes' 8-bit AdamW: one step on a 64 K-element tensor (8-bit state starts at 4096 elements), then one
    tiny-preset epoch through the trainer (CUDA only: engine.optimizer=adamw8bit refuses a CPU). The tiny preset:
    this checks that it runs; its memory saving is nil for LoRA training either way (SD 1.5's rank-4 LoRA has
    ~0.8 M parameters)."""
    import torch

    import bitsandbytes as bnb

    device = ctx.device
    p = torch.nn.Parameter(torch.randn(65536, device=device))
    opt = bnb.optim.AdamW8bit([p], lr=1e-3)
    before = p.detach().clone()
    p.grad = torch.randn_like(p)
    opt.step()
    moved = bool(torch.isfinite(p).all()) and not torch.equal(before, p.detach())
    state = opt.state[p]
    dtypes = sorted({str(v.dtype)[6:] for v in state.values() if torch.is_tensor(v) and v.numel() > 1})
    emit("adamw8bit_step", moved, note=f"{device}, state dtypes {','.join(dtypes)}", status="ok" if moved else "failed")
    if device != "cuda":
        emit("adamw8bit_epoch", "", note="the trainer's adamw8bit needs CUDA", status="skipped")
        return
    _epoch_stage("tiny", ["dag.algorithm=db", "engine.backend=torch", "engine.optimizer=adamw8bit"], prefix="epoch.")


def nvml_telemetry_under_load(nvml: Any, load: Callable[[], None], seconds: float = 3.0) -> None:
    """Emit GPU 0's board facts and its power, clocks and temperature idle and while ``load()`` runs repeatedly for
    ``seconds`` (sampled every 0.1 s on a side thread), with the clock-event (throttle) reasons seen under load.
    ``nvml`` is the pynvml module, initialised."""
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    emit("driver", str(nvml.nvmlSystemGetDriverVersion()))
    emit("power_limit_w", nvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000, "W")
    emit("memory_total_mib", nvml.nvmlDeviceGetMemoryInfo(h).total / 2**20, "MiB")
    reasons_of = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
        nvml, "nvmlDeviceGetCurrentClocksThrottleReasons", None)

    def sample() -> dict[str, float]:
        return {"power_w": nvml.nvmlDeviceGetPowerUsage(h) / 1000,
                "sm_clock_mhz": float(nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM)),
                "mem_clock_mhz": float(nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_MEM)),
                "temperature_c": float(nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU))}

    for key, value in sample().items():
        emit(f"idle.{key}", value)
    samples, reasons, stop = [], [], threading.Event()

    def poll() -> None:
        while not stop.is_set():
            samples.append(sample())
            if reasons_of is not None:
                reasons.append(int(reasons_of(h)))
            time.sleep(0.1)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    t_end = time.perf_counter() + seconds
    try:
        while time.perf_counter() < t_end:
            load()
    finally:
        stop.set()
        poller.join()
    for key in ("power_w", "sm_clock_mhz", "temperature_c"):
        values = [s[key] for s in samples]
        emit(f"load.{key}.max", max(values))
        emit(f"load.{key}.min", min(values))
    if reasons:  # NVML's bit mask: 0x1 idle, 0x2 application clocks; 0x4 power cap, 0x8/0x20/0x40/0x80 slowdowns
        seen = 0
        for r in reasons:
            seen |= r
        emit("load.clock_event_reasons", hex(seen), note="OR over the load's samples; only 0x1/0x2 bits: not throttled")
    else:
        emit("load.clock_event_reasons", "", note="this NVML binding cannot read them", status="skipped")


def _nvml_stage(ctx: Context) -> None:
    """NVML: the board, its limits, and its power, clocks and temperature idle and under 3 s of bf16 matmuls."""
    import torch

    import pynvml

    if ctx.device != "cuda":
        emit("nvml", "", note="no CUDA device", status="skipped")
        return
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)  # [8192, 8192]: ~1 TFLOP a product

    def load() -> None:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()

    pynvml.nvmlInit()
    try:
        nvml_telemetry_under_load(pynvml, load)
    finally:
        pynvml.nvmlShutdown()


@dataclass(frozen=True)
class Stage:
    """One stage: its child-process body, what it shows, and its time limit = ``rehearsal_s × factor`` (rounded up
    to 5 s): ``rehearsal_s`` measured by ``--rehearse`` on the CPU (tiny presets; REHEARSAL below), ``factor`` the
    estimated cost of the stage's H200 run (sd15, bf16) relative to that rehearsal, for the reason in ``why``."""

    run: Callable[[Context], None]
    what: str
    rehearsal_s: float
    factor: float
    why: str
    needs: tuple[str, ...] = ()
    headline: tuple[str, ...] = ("*",)  # fnmatch patterns of the metrics the summary shows (failures always)
    optional: bool = False  # runs after the rest, only when its whole limit fits what is left of the budget

    @property
    def limit(self) -> int:
        return int(5 * math.ceil(self.rehearsal_s * self.factor / 5))


# Measured 2026-12-05: `fastdag bench gpu-check --rehearse` on 2 shared Xeon cores (load average ~2, one thread per
# process), the image's versions where installable (Python 3.11.7, torch 2.13.0 CPU, transformers 5.17.0,
# huggingface-hub 1.33.0, triton 3.6.0, diffusers 0.42.1, peft 0.21.2, deepspeed 0.19.8, bitsandbytes 0.50.2, numpy
# 2.3.5): each stage's seconds, a fresh process, imports included (wall = CPU there). The factor is the stage's
# estimated H200 cost (sd15, bf16; in `why`, with ~30 % margin) over that rehearsal: estimates until a GPU run
# measures them (then: limit = measured x 1.5). docs/results/2026-12-05-gpu-check-rehearsal.md has the run and table.
STAGES: dict[str, Stage] = {
    "install": Stage(_install_stage, "pip-install .whl/, then which carried packages import", 7.1, 4.2,
                     "~20 s: pip --no-deps --no-compile of 10 wheels (15 MB; 0.9 s here) + importing diffusers, peft, "
                     "deepspeed, bitsandbytes (its CUDA library) in one process"),
    "throughput": Stage(_throughput_stage, "P2-P4: fastdag vs official-cost epochs, rollout / UNet-only, MFU", 9.5,
                        16.3, "~120 s: 2 sd15 builds (~12 s each: 1.07 B parameters initialised on the CPU, ~7 s on 2 "
                        "cores here) + a FLOP-counted warm-up and a timed epoch per mode (~3.5 PFLOP fastdag, ~6.5 "
                        "official at ~350 TFLOP/s, plus JPEG rewards: ~10 s and ~25 s an epoch)",
                        ("diffusers", "peft"),
                        ("*.epoch_seconds", "official.official_over_fastdag_epoch", "*.rollout_over_unet_only", "*.mfu",
                         "*.peak_memory_mib", "official.same_first_epoch_rewards", "official.first_epoch_reward_max_*",
                         "fastdag.unet_only_traj_per_s", "device.matmul_tflops")),
    "bandwidth": Stage(_bandwidth_stage, "P5: fused DDIM step vs eager PyTorch and a device copy", 2.0, 15,
                       "~15 s: start-up, Triton JIT of the step's forward and backward kernels, 2 batch sizes x 2 "
                       "modes x 2 providers x 25 calls of a few ms"),
    "kernels": Stage(_kernels_stage, "kernel tests on compiled Triton (CUDA tensors)", 34.5, 1.7,
                     "~40 s: 8 pytest-xdist workers (imports ~8 s), ~200 Triton specialisations JIT-compiled "
                     "(~0.5 s each, cold cache), 278 tests of milliseconds", headline=("kernel_tests", "test_*")),
    "epochs": Stage(_epochs_stage, "DAG-DB and DAG-KL epoch, bf16, DeepSpeed ZeRO-2", 8.9, 10.1,
                    "~70 s: 2 x (sd15 build ~12 s + DeepSpeed init ~3 s + a first epoch ~15 s) + start-up",
                    ("diffusers", "peft", "deepspeed"),
                    ("*.epoch_seconds", "*.peak_memory", "*.loss", "*.kl_loss", "*.finite", "*.logp_mismatch_max")),
    "graphs": Stage(_graphs_stage, "eager vs CUDA-graph denoising at batch 1 and 8", 6.9, 7.2,
                    "~42 s: 1 sd15 build + 5 eager and 5 graphed 50-step rollouts at batch 1 (~0.5 s each) and 8 "
                    "(~1.6 s each)", ("diffusers", "peft")),
    "attention": Stage(_attention_stage, "SDPA backends at SD 1.5's attention; whether xformers loads", 1.5, 10,
                       "~8 s: start-up and CUDA init, 4 SDPA backends x 13 calls at 16x8x4096x40 (math ~10 ms a call)"),
    "adamw8bit": Stage(_adamw8bit_stage, "bitsandbytes AdamW8bit: one step, one tiny epoch", 3.9, 6.4,
                       "~18 s: bitsandbytes' CUDA library, one step, a tiny build and epoch on the GPU (Triton JIT)",
                       ("bitsandbytes", "diffusers", "peft")),
    "nvml": Stage(_nvml_stage, "NVML telemetry idle and under load", 1.4, 10.7,
                  "~9 s: start-up and CUDA init + 3 s of bf16 matmuls", ("pynvml",),
                  ("nvml", "driver", "power_limit_w", "load.*.max", "load.sm_clock_mhz.min",
                   "load.clock_event_reasons")),
    "sd35m": Stage(_sd35m_stage, "P2-P4 at SD3.5 Medium's size: fastdag vs official-cost epochs, MFU", 10.0, 8.0,
                   "~60 s (with margin 80): 2 sd35-medium-random builds on the GPU (2.5 B transformer, T5-XXL "
                   "4.7 B, CLIP-G; bf16 init ~10 s each) + per mode a FLOP-counted warm-up and a timed epoch of 8 trajectories x 10 steps "
                   "at 512 px (~1.1 PFLOP rollout, ~3 PFLOP update at ~400 TFLOP/s: ~10-15 s an epoch, official "
                   "~25 s)", ("diffusers", "peft"),
                   ("*.epoch_seconds", "official.official_over_fastdag_epoch", "*.rollout_over_unet_only", "*.mfu",
                    "*.peak_memory_mib"), optional=True),
}


def limits(overrides: Sequence[str] = ()) -> dict[str, int]:
    """Each stage's limit in seconds, with ``NAME=SECONDS`` overrides."""
    out = {name: stage.limit for name, stage in STAGES.items()}
    for item in overrides:
        name, _, seconds = item.partition("=")
        if name not in STAGES or not seconds.replace(".", "", 1).isdigit():
            raise SystemExit(f"--limit {item!r}: expected NAME=SECONDS with NAME one of {', '.join(STAGES)}")
        out[name] = max(1, int(float(seconds)))
    return out


def install_carried(wheels_dir: Path = WHEELS, site: Path = SITE, for_image: bool = False) -> tuple[Optional[int], str]:
    """pip-install the wheels in ``wheels_dir`` into ``site`` (--no-deps, as the device tool advises: the image's own
    packages stay as they are) and put it first on this process's path. ``for_image``: install them for the image's
    CPython 3.12 instead (a rehearsal on another Python checks that pip takes the set; nothing goes on the path).
    (wheels installed or None if pip failed, a note)."""
    wheels = sorted(str(p) for p in wheels_dir.glob("*.whl")) if wheels_dir.is_dir() else []
    if not wheels:
        return 0, f"no wheels carried in {wheels_dir.name}/: the installed packages are used"
    image = ["--python-version", ".".join(map(str, IMAGE_PYTHON)), "--implementation", "cp", "--only-binary=:all:",
             *PLATFORMS] if for_image else []
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                          "--no-cache-dir", "--disable-pip-version-check", "--upgrade", *image, "--target", str(site),
                          *wheels], capture_output=True, text=True)
    if res.returncode != 0:
        print(res.stdout + res.stderr)
        return None, "pip failed: " + (res.stderr.strip().splitlines() or [""])[-1][:200]
    if not for_image and str(site) not in sys.path:
        sys.path.insert(0, str(site))
    size = sum(Path(w).stat().st_size for w in wheels) / 2**20
    return len(wheels), f"{len(wheels)} wheels, {size:.1f} MiB"


def _activate_site(site: Path = SITE) -> None:
    """Put the installed carried packages first on the path of this process and of every later stage."""
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    if str(site) not in sys.path:
        sys.path.insert(0, str(site))


def _parameter_line(preset: str) -> str:
    if preset != "sd15":
        return ""
    try:  # imports diffusers: only once the carried wheels are installed (or in a dry run, where they are not)
        from fastdag.families.presets import sd15_parameter_counts

        counts = sd15_parameter_counts()
    except ImportError as e:
        return f"model parameters: counted once diffusers imports ({type(e).__name__}: {e})"
    return "model parameters: " + ", ".join(f"{k} {v / 1e6:.0f} M" for k, v in counts.items())


def plan(preset: str, stages: Sequence[str], stage_limits: dict[str, int], budget: int,
         out: Optional[Path] = None) -> list[str]:
    """The plan: the model size, the carried wheels, each stage's limit and how it was derived, the files."""
    from fastdag.config import load_config

    cfg = load_config(None, [*SIZES[preset], *EPOCH])
    lines = [f"gpu-check plan, preset {preset}: {cfg.model.pretrained} ({cfg.model.dtype}), "
             f"{cfg.trajectories_per_epoch} trajectories x {cfg.sample.num_steps} steps per epoch, "
             f"{cfg.trajectories_per_epoch * cfg.trained_timesteps} trained transitions"]
    params = _parameter_line(preset)
    if params:
        lines.append(params)
    wheels = sorted(WHEELS.glob("*.whl")) if WHEELS.is_dir() else []
    lines.append(f"carried wheels in .whl/: {len(wheels)} ({sum(p.stat().st_size for p in wheels) / 2**20:.1f} MiB)"
                 if wheels else "carried wheels in .whl/: none (run --prepare-wheels on a machine with PyPI)")
    total = 0
    lines.append(f"  {'stage':<11} {'limit':>7}  {'= rehearsal x factor':<22} what")
    for name in stages:
        s, limit = STAGES[name], stage_limits[name]
        total += 0 if s.optional else limit
        derived = f"{s.rehearsal_s:g} s x {s.factor:g}" + ("" if limit == s.limit else f" (set: {limit})")
        lines.append(f"  {name:<11} <= {limit:>3} s  {derived:<22} {s.what}"
                     + (" [if its whole limit is left]" if s.optional else ""))
    lines.append(f"worst case {total} s of the {budget} s budget (installs included; optional stages only in what "
                 f"the others leave); a stage that would pass the budget runs on what is left if that is >= "
                 f"{MIN_FRACTION:.0%} of its limit, else it is skipped")
    where = str(out) if out is not None else "--out, default $OUT when set, else " + str(
        DEFAULT_OUT.relative_to(harness.REPO_ROOT)) + "/<time>"
    lines.append(f"results in {where}: {CSV_NAME} (rows as measured), {SUMMARY_NAME}, {LOG_NAME}, {LIVE_NAME} "
                 f"(the running stage), {THROUGHPUT_NAME}, {KERNELS_NAME}")
    return lines


class Interrupted(Exception):
    """The parent got SIGTERM, SIGINT or SIGHUP: the running stage's group is killed, what is done is written."""


def _interrupt(signum: int, frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a stage's whole process group (its session: pytest workers, DeepSpeed helpers, ...)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


@dataclass
class StageResult:
    name: str
    status: str  # ok | failed | timed out | skipped | interrupted
    seconds: float
    limit: int
    rows: list[dict[str, Any]]
    note: str = ""
    cpu_seconds: float = 0.0  # user + system of the stage's processes: what a loaded machine does not inflate
    load: str = ""  # the 1-minute load average at its start and end


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class Recorder:
    """Writes ``--out`` as the check goes: the stage rows of the parent, the log, the running summary."""

    def __init__(self, out: Path, run_id: str, budget: int):
        self.out, self.run_id, self.budget = out, run_id, budget
        self.results: list[StageResult] = []
        self.header: list[str] = []
        out.mkdir(parents=True, exist_ok=True)

    def log(self, text: str) -> None:
        with open(self.out / LOG_NAME, "a") as f:
            f.write(text if text.endswith("\n") else text + "\n")

    def stage_log(self, name: str, live: Path) -> None:
        data = live.read_bytes() if live.exists() else b""
        if len(data) > LOG_HEAD + LOG_TAIL:
            cut = len(data) - LOG_HEAD - LOG_TAIL
            gap = f"\n[... {cut} bytes of this stage's log left out ...]\n".encode()
            data = data[:LOG_HEAD] + gap + data[-LOG_TAIL:]
        with open(self.out / LOG_NAME, "ab") as f:
            f.write(f"\n===== stage {name} =====\n".encode() + data)
        live.unlink(missing_ok=True)

    def finish(self, result: StageResult) -> None:
        self.results.append(result)
        env = _environment()
        ran = f"limit {result.limit} s; cpu {result.cpu_seconds:.1f} s; load {result.load}" if result.load else ""
        append_result(self.out, env, self.run_id, result.name,
                      {"metric": "stage_seconds", "value": round(result.seconds, 1), "unit": "s",
                       "status": result.status, "note": "; ".join(n for n in (ran, result.note) if n)})
        self.summary(env)

    def summary(self, env: Optional[dict[str, str]] = None, running: str = "") -> None:
        env = env or _environment()
        spent = sum(r.seconds for r in self.results)
        lines = [f"# GPU check — {env['hardware']}", "",
                 f"run {self.run_id}, git {env['git_revision']}, driver {env['driver']}, torch {env['torch_version']}, "
                 f"triton {env['triton_version']}, transformers {env['transformers_version']}, diffusers "
                 f"{env['diffusers_version']}, peft {env['peft_version']}, deepspeed {env['deepspeed_version']}, "
                 f"bitsandbytes {env['bitsandbytes_version']}", "", *self.header, "",
                 f"{spent:.0f} s of the {self.budget} s budget spent" + (f"; running: {running}" if running else ""),
                 "", "| stage | status | seconds | cpu s | limit | results (all in gpu_check.csv) |",
                 "|---|---|---:|---:|---:|---|"]
        for r in self.results:
            patterns = STAGES[r.name].headline if r.name in STAGES else ("*",)
            picked = [row for row in r.rows if row.get("status") == "failed"
                      or any(fnmatch.fnmatchcase(row["metric"], pat) for pat in patterns)]
            shown = "; ".join(f"{row['metric']} {_short(row['value'])}{(' ' + row['unit']) if row.get('unit') else ''}"
                              f"{(' (' + str(row['note'])[:80] + ')') if row.get('note') else ''}"
                              for row in picked[:16])
            more = f"; ... {len(r.rows) - len(picked[:16])} more" if len(r.rows) > len(picked[:16]) else ""
            note = f" — {r.note}" if r.note else ""
            lines.append(f"| {r.name} | {r.status} | {r.seconds:.0f} | {r.cpu_seconds:.0f} | {r.limit} | "
                         f"{shown}{more}{note} |")
        tmp = self.out / (SUMMARY_NAME + ".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, self.out / SUMMARY_NAME)


def run_stage(name: str, ctx: Context, limit: float, run_id: str) -> StageResult:
    """Run one stage in a child process in its own session, its output into ``stage.log``; past ``limit`` seconds
    its whole process group is killed. The result rows are the child's (also already in ``gpu_check.csv``)."""
    assert ctx.out is not None
    live = ctx.out / LIVE_NAME
    cmd = [sys.executable, "-m", "fastdag.bench.gpu_check", "--stage", name, "--preset", ctx.preset,
           *(["--rehearse"] if ctx.rehearse else [])]
    env = {**os.environ, OUT_ENV: str(ctx.out), RUN_ID_ENV: run_id, PARENT_ENV: str(os.getpid()),
           "PYTHONUNBUFFERED": "1"}
    t0, cpu0, load0 = time.perf_counter(), _children_cpu(), _load()
    status, note = "", ""
    with open(live, "w") as log:
        log.write(f"$ {' '.join(cmd)}  (limit {limit:.0f} s, started {_timestamp()})\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=harness.REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            code, status, note = None, "timed out", f"killed (its process group) after {limit:.0f} s"
        except Interrupted as e:
            code, status, note = None, "interrupted", f"the check got {e}"
            raise
        finally:
            _kill_group(proc)  # also after a normal exit: nothing it started may keep the GPU busy
            seconds = time.perf_counter() - t0
            if status:
                log.write(f"\n[gpu-check] {note}\n")
    rows = [json.loads(line[len(MARK):]) for line in live.read_text(errors="replace").splitlines()
            if line.startswith(MARK)]
    if not status:
        status = "ok" if code == 0 and all(r["status"] != "failed" for r in rows) else "failed"
        if status == "ok" and rows and all(r["status"] == "skipped" for r in rows):
            status = "skipped"
        if code not in (0, None):
            tail = [ln for ln in live.read_text(errors="replace").splitlines() if ln.strip() and not
                    ln.startswith(MARK)][-1:]
            note = f"exit {code}: {tail[0][:240] if tail else ''}"
    return StageResult(name, status, seconds, int(limit), rows, note, _children_cpu() - cpu0,
                       f"{load0:.1f} -> {_load():.1f}")


def _process_age() -> float:
    """Seconds since this process started (Linux; 0 elsewhere): the budget counts Python's and torch's start too."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def _have(rows: list[dict[str, Any]]) -> dict[str, str]:
    """From the install stage's rows: for each package that does not import, why."""
    return {r["metric"][5:]: r["note"] for r in rows if r["metric"].startswith("have_") and r["value"] is False}


def run_check(args: argparse.Namespace) -> int:
    """Run the stages in order of value within the budget, recording into --out as they go. Exit status: 0 when
    every stage was ok or skipped, 1 otherwise, 2 when --out cannot take the rows, 130 when interrupted."""
    preset = args.preset or ("tiny" if args.rehearse else "sd15")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out or os.environ.get("OUT") or DEFAULT_OUT / stamp).resolve()
    run_id = f"{int(time.time()):x}"
    stage_limits, budget = limits(args.limit or ()), args.budget
    stages = [s for s in STAGES if s in args.stages]  # always in order of value
    ctx = Context(preset, args.rehearse, out)
    if (out / CSV_NAME).exists():  # refuse now rather than lose the rows of a stage minutes from now
        with open(out / CSV_NAME, newline="") as f:
            if tuple(next(csv.reader(f), [])) != FIELDS:
                print(f"gpu-check: {out / CSV_NAME} has other columns; choose another --out", file=sys.stderr)
                return 2
    if args.rehearse:  # two cores, shared: one thread per process, as the test suite runs (DESIGN.md §6)
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        # DeepSpeed JIT-builds a CPU-only op (shm_comm, ~50 s) into this folder; shared with other venvs it is rebuilt
        # whenever they built it last. Its own folder keeps the rehearsal's timings free of that (no GPU builds it).
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(tempfile.gettempdir()) / (
            "fastdag-gpu-check-ext-" + format(zlib.crc32(sys.prefix.encode()), "08x"))))
    rec = Recorder(out, run_id, budget)
    rec.header = [f"preset {preset}{' (CPU rehearsal)' if args.rehearse else ''}; {_process_age():.1f} s to start; "
                  f"stages {', '.join(f'{s} <= {stage_limits[s]} s' for s in stages)}"]
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    start = time.perf_counter() - _process_age()
    missing: Optional[dict[str, str]] = None
    planned = False
    try:
        rec.log(f"gpu-check run {run_id}, {_timestamp()}, out {out}")
        rec.summary(running=stages[0] if stages else "")
        for name in stages:
            if name != "install" and not planned:  # install first, then plan (it may import diffusers)
                rec.log("\n".join(plan(preset, stages, stage_limits, budget, out)))
                planned = True
            left = budget - (time.perf_counter() - start)
            limit = min(stage_limits[name], left)
            lacking = [m for m in STAGES[name].needs if missing is not None and m in missing]
            if lacking:
                result = StageResult(name, "skipped", 0.0, 0, [], "needs " + "; ".join(
                    f"{m} ({missing[m]})" for m in lacking))  # type: ignore[index]
            elif left < (1.0 if STAGES[name].optional else MIN_FRACTION) * stage_limits[name]:
                result = StageResult(name, "skipped", 0.0, stage_limits[name], [],
                                     f"{left:.0f} s of the {budget} s budget left")
            else:
                print(f"gpu-check: {name} (<= {limit:.0f} s) ...", flush=True)
                rec.summary(running=name)
                result = run_stage(name, ctx, limit, run_id)
                rec.stage_log(name, out / LIVE_NAME)
            print(f"gpu-check: {name}: {result.status} in {result.seconds:.0f} s (cpu {result.cpu_seconds:.0f} s, "
                  f"load {result.load or '-'})" + (f" ({result.note})" if result.note else ""), flush=True)
            if name == "install" and result.status in ("ok", "skipped", "failed"):
                if any(r["metric"] == "pip_install_seconds" for r in result.rows):
                    _activate_site()
                missing = _have(result.rows)
            rec.finish(result)
        if not planned:
            rec.log("\n".join(plan(preset, stages, stage_limits, budget, out)))
    except Interrupted as e:
        rec.stage_log("(interrupted)", out / LIVE_NAME)
        rec.finish(StageResult("check", "interrupted", 0.0, 0, [], f"the check got {e}"))
        print(f"gpu-check: interrupted ({e}); results so far in {out}", file=sys.stderr)
        return 130
    print(f"gpu-check: results in {out} ({', '.join(sorted(p.name for p in out.iterdir()))})")
    return 0 if all(r.status in ("ok", "skipped") for r in rec.results) else 1


def strip_wheel(path: Path, keep: Callable[[str], bool]) -> int:
    """Rewrite a wheel without the members ``keep`` rejects (their RECORD lines go too). Bytes saved."""
    before = path.stat().st_size
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(path) as src:
        dropped = {i.filename for i in src.infolist() if not keep(i.filename)}
        if not dropped:
            return 0
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
            for info in src.infolist():
                if info.filename in dropped:
                    continue
                data = src.read(info)
                if info.filename.endswith(".dist-info/RECORD"):
                    data = "".join(line for line in data.decode().splitlines(keepends=True)
                                   if line.split(",", 1)[0] not in dropped).encode()
                dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    os.replace(tmp, path)
    return before - path.stat().st_size


def _tree_bytes() -> Optional[int]:
    """Bytes of what the device tool sends: tracked files and untracked ones git does not ignore (None without git)."""
    try:
        res = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=harness.REPO_ROOT, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if res.returncode != 0:
        return None
    paths = (harness.REPO_ROOT / p for p in res.stdout.decode().split("\0") if p)
    return sum(p.stat().st_size for p in paths if p.is_file())


def device_command(revision: str) -> str:
    """The one line to run on the lent GPU machine (the device tool: carry=['.whl'], timeout_s=600)."""
    return f'PYTHONUNBUFFERED=1 python3 -m fastdag.bench gpu-check --out "$OUT" --git-revision {revision}'


def carried_report(wheels_dir: Path = WHEELS) -> list[str]:
    """What travels: the carried wheels, the tree, their sum against the device tool's 64 MiB."""
    wheels = sorted(wheels_dir.glob("*.whl")) if wheels_dir.is_dir() else []
    size = sum(p.stat().st_size for p in wheels)
    lines = [f"  {p.name:<70} {p.stat().st_size / 1e6:6.2f} MB" for p in wheels]
    lines.append(f"carried: {len(wheels)} wheels, {size / 1e6:.1f} MB ({size / 2**20:.1f} MiB) in {wheels_dir}")
    tree = _tree_bytes()
    if tree is not None:
        lines.append(f"with the tree that travels ({tree / 2**20:.1f} MiB): {(tree + size) / 2**20:.1f} MiB of the "
                     f"device tool's 64 MiB")
    return lines


def fetch_wheel(requirement: str, wheels_dir: Path) -> bool:
    """pip-download ``requirement``'s wheel for the GPU image (CPython 3.12, manylinux x86-64); for an sdist-only
    package (deepspeed) build a pure-Python wheel here. Whether it worked."""
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels_dir), "--only-binary=:all:",
           "--python-version", ".".join(map(str, IMAGE_PYTHON)), "--implementation", "cp", *PLATFORMS, requirement]
    if subprocess.run(cmd).returncode == 0:
        return True
    return subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                           str(wheels_dir), requirement]).returncode == 0


def prepare_wheels(wheels_dir: Path = WHEELS, fetch: Callable[[str, Path], bool] = fetch_wheel) -> int:
    """Fetch the carried wheels (``requirements-gpu.lock``), strip what :data:`STRIP` names, drop wheels of other
    versions (two versions of one package stop the whole install), and state the size of what travels."""
    wheels_dir.mkdir(exist_ok=True)
    pins = carried_pins()
    failed = [requirement for requirement in pins if not fetch(requirement, wheels_dir)]
    wanted = {(_normalise(p.split("==")[0]), p.split("==")[1]) for p in pins}
    for wheel in wheels_dir.glob("*.whl"):
        name, version = wheel.name.split("-")[:2]
        if (_normalise(name), version) not in wanted:
            print(f"gpu-check: removing {wheel.name} (not pinned in {GPU_LOCK.name})")
            wheel.unlink()
            continue
        keep = STRIP.get(_normalise(name))
        if keep is not None:
            saved = strip_wheel(wheel, keep)
            if saved:
                print(f"gpu-check: stripped {wheel.name}: {saved / 1e6:.1f} MB of other platforms' libraries left out")
    print("\n".join(carried_report(wheels_dir)))
    revision = harness.git_revision()
    print(f"on the GPU machine (device tool: carry=['.whl'], timeout_s=600):\n  {device_command(revision)}")
    if failed:
        print(f"gpu-check: could not fetch or build {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _child(args: argparse.Namespace) -> int:
    """A stage's own process: watch the parent, run the stage body, turn an exception into a failed row."""
    global _STAGE
    _STAGE = args.stage
    parent = int(os.environ.get(PARENT_ENV) or 0)
    if parent:
        _watch_parent(parent)
    ctx = Context(args.preset or ("tiny" if args.rehearse else "sd15"), args.rehearse,
                  Path(os.environ[OUT_ENV]) if os.environ.get(OUT_ENV) else None)
    print(f"[gpu-check] stage {_STAGE}: pid {os.getpid()}, process group {os.getpgid(0)}", flush=True)
    try:
        STAGES[args.stage].run(ctx)
    except Exception as e:
        traceback.print_exc()
        emit("error", "", note=f"{type(e).__name__}: {str(e).strip()[:240]}", status="failed")
        return 1
    return 0


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fastdag bench gpu-check", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="print the plan, limits and sizes; needs no GPU")
    p.add_argument("--rehearse", action="store_true", help="run every stage on this CPU (tiny presets)")
    p.add_argument("--prepare-wheels", action="store_true", help="fill .whl/ with the wheels the GPU image lacks")
    p.add_argument("--out", default=None, help="results folder (default: $OUT when set, else "
                                               "docs/results/bench/gpu_check/<time>)")
    p.add_argument("--git-revision", default=None, help="the code's revision, for a copied tree without .git "
                                                        "(default: $FASTDAG_GIT_REVISION, else git)")
    p.add_argument("--preset", choices=sorted(SIZES), default=None,
                   help="model size (default: sd15 on a GPU, tiny in the rehearsal)")
    p.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES), help="stages to run")
    p.add_argument("--limit", action="append", metavar="NAME=SECONDS", help="override a stage's time limit")
    p.add_argument("--budget", type=int, default=BUDGET_SECONDS, help="seconds for the whole check")
    p.add_argument("--stage", choices=list(STAGES), help=argparse.SUPPRESS)  # a child process runs one stage
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.stage:
        return _child(args)
    if args.git_revision:
        os.environ[harness.GIT_REVISION_ENV] = args.git_revision
    if args.prepare_wheels:
        return prepare_wheels()
    if args.dry_run:
        preset = args.preset or ("tiny" if args.rehearse else "sd15")
        print("\n".join(plan(preset, [s for s in STAGES if s in args.stages], limits(args.limit or ()), args.budget,
                             Path(args.out) if args.out else None)))
        return 0
    os.environ.setdefault(harness.GIT_REVISION_ENV, harness.git_revision())  # once, for every stage's rows
    import torch

    if not args.rehearse and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; it runs on a machine with one GPU (--dry-run shows the plan, "
              "--rehearse runs it on this CPU)", file=sys.stderr)
        return 2
    return run_check(args)


if __name__ == "__main__":
    sys.exit(main())
