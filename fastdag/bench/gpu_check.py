"""``fastdag bench gpu-check``: everything that needs a GPU, in one command that fits a lent machine's lease.

    fastdag bench gpu-check --prepare-wheels     # on a CPU machine with PyPI: wheels the GPU image lacks
    fastdag bench gpu-check --dry-run            # the plan and its sizes; needs no GPU
    fastdag bench gpu-check                      # on one CUDA GPU, in at most ~8 minutes

Stages, each in its own subprocess with its own time limit, so one failure is recorded and the rest still run:

=============  ====================================================================================================
``install``    pip-installs the wheels carried in ``.whl/`` (diffusers, deepspeed, ... : the GPU image has torch,
               triton, transformers and peft, not these); what cannot be installed is logged and its stages skip
``kernels``    the kernel tests against compiled Triton (``TRITON_INTERPRET=0``, CUDA tensors)
``db``/``kl``  ``sd15-random`` in bf16: one DAG-DB and one DAG-KL epoch, 8 trajectories × 50 steps, DeepSpeed
               ZeRO-2, one process: seconds, peak memory, finite losses, NVML telemetry
``attention``  rollout seconds with SDPA vs xformers (where its ops load; otherwise the reason)
``adamw8bit``  one epoch with bitsandbytes' 8-bit AdamW (where it imports)
``throughput`` the throughput suite's sd15 rows (``fastdag bench sd15 --epochs 1``): fastdag vs
               official-cost epochs, rollout vs UNet-only forward, MFU, CUDA graphs on vs off at batch 1, 2, 8
=============  ====================================================================================================

Rows append to ``docs/results/bench/gpu_check.csv`` (GPU, driver and versions in every row); a summary table goes
to ``docs/results/bench/gpu_check.md``. Without CUDA (and without ``--dry-run``) it exits 2 with one line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from fastdag.bench import harness

RESULTS = harness.RESULTS_DIR / "gpu_check.csv"
SUMMARY = harness.RESULTS_DIR / "gpu_check.md"
WHEELS = harness.REPO_ROOT / ".whl"
FIELDS = ("timestamp", "git_revision", "hardware", "driver", "torch_version", "triton_version", "diffusers_version",
          "deepspeed_version", "run_id", "stage", "status", "metric", "value", "unit", "note")
MARK = "GPU_CHECK_RESULT "
BUDGET_SECONDS = 480  # the whole check, end to end (a lent machine's lease is 15 minutes, start-up included)
# What the GPU image lacks (DESIGN.md §6), at exact versions: fetched or built by --prepare-wheels, installed with
# --no-deps before the stages run.
GPU_LOCK = harness.REPO_ROOT / "requirements-gpu.lock"


def carried_pins(optional: bool = False, lock: Path = GPU_LOCK) -> list[str]:
    """The ``name==version`` lines of the GPU lock; those marked ``# optional`` only when asked for."""
    pins = []
    for raw in lock.read_text().splitlines():
        line, _, comment = raw.partition("#")
        if line.strip() and (optional or not comment.strip().startswith("optional")):
            pins.append(line.strip())
    return pins

IMPORTS = ("diffusers", "deepspeed", "bitsandbytes", "pynvml")
SITE = Path(tempfile.gettempdir()) / "fastdag-gpu-check-site"

SIZES = {
    "sd15": ["model.pretrained=sd15-random", "model.dtype=bfloat16", "sample.num_steps=50", "sample.batch_size=8",
             "train.batch_size=8"],
    "tiny": ["model.pretrained=tiny-random", "sample.num_steps=10", "sample.batch_size=8", "train.batch_size=4",
             "dag.flow.block_out_channels=[32,64]", "dag.flow.norm_num_groups=8"],
}
EPOCH = ["sample.num_batches_per_epoch=1", "train.gradient_accumulation_steps=1", "train.epochs=1",
         "reward.name=jpeg_compressibility", "prompts.source=tiny", "logging.progress=false", "logging.grid_size=0",
         "checkpoint.save_final=false", "dag.beta_schedule=constant"]


def emit(metric: str, value: Any, unit: str = "", note: str = "", status: str = "ok") -> None:
    """A result line the parent process collects (one JSON object after MARK)."""
    print(MARK + json.dumps({"metric": metric, "value": value, "unit": unit, "note": note, "status": status}),
          flush=True)


# ----- stages, run in a child process ----------------------------------------------------------------------------
def _epoch_stage(preset: str, extra: list[str]) -> None:
    import torch

    from fastdag.config import load_config
    from fastdag.profiling import nvml_telemetry, peak_memory_mib, reset_peak_memory
    from fastdag.trainer import Trainer

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(None, [*SIZES[preset], *EPOCH, *extra, f"logging.output_dir={out}"])
        t0 = time.perf_counter()
        trainer = Trainer(cfg)
        emit("build_seconds", round(time.perf_counter() - t0, 2), "s")
        reset_peak_memory(trainer.device)
        row = trainer.fit()[0]
        emit("peak_memory", round(peak_memory_mib(trainer.device), 1), "MiB")
        for key in ("rollout_seconds", "update_seconds"):
            emit(key, round(row[key], 3), "s")
        finite = all(torch.isfinite(torch.tensor(float(v))) for k, v in row.items() if k != "epoch")
        for key in ("loss", "db_loss", "kl_loss", "reward_mean", "grad_norm_lora", "grad_norm_flow"):
            if key in row:
                emit(key, row[key])
        emit("finite", finite, status="ok" if finite else "failed")
        for key, value in nvml_telemetry(trainer.device).items():
            emit(key, value)


def _attention_stage(preset: str) -> None:
    from fastdag.bench.throughput import rollout_batch_seconds
    from fastdag.config import load_config
    from fastdag.trainer import Trainer

    for backend in ("sdpa", "xformers"):
        with tempfile.TemporaryDirectory() as out:
            cfg = load_config(None, [*SIZES[preset], *EPOCH, f"model.attention={backend}", f"logging.output_dir={out}"])
            trainer = Trainer(cfg)
            used = trainer.model.attention
            if used != backend:
                emit(f"rollout_seconds_{backend}", "", "s", note=f"xformers does not run here; {used} kept",
                     status="skipped")
                continue
            seconds = rollout_batch_seconds(trainer, cfg.sample.batch_size, cuda_graphs=False, warmup=1, repeat=3)
            emit(f"rollout_seconds_{backend}", round(seconds, 4), "s", note=f"batch {cfg.sample.batch_size}")


def _adamw8bit_stage(preset: str) -> None:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # ImportError, or a build without this GPU's kernels
        emit("adamw8bit", "", note=f"bitsandbytes does not import: {type(e).__name__}", status="skipped")
        return
    _epoch_stage(preset, ["dag.algorithm=db", "engine.backend=torch", "engine.optimizer=adamw8bit"])


def _kernels_stage() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    tests = ["tests/test_kernels_ddim_step.py", "tests/test_kernels_db_residual.py", "tests/test_ddim_settings.py"]
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=harness.REPO_ROOT,
                         env=env, capture_output=True, text=True)
    last = (res.stdout.strip().splitlines() or [""])[-1]
    emit("kernel_tests", last, status="ok" if res.returncode == 0 else "failed")


def _throughput_stage(preset: str) -> None:
    from fastdag.bench import throughput

    summary = throughput.main([preset, "--epochs", "1", "--repeat", "2", "--graph-batches", "1", "8",
                               "--results", str(harness.RESULTS_DIR / "throughput.csv")])
    for mode, values in summary.items():
        for key, value in values.items():
            emit(f"{mode}.{key}", value)


def install_carried() -> str:
    """pip-install the wheels carried in .whl/ into a side directory (--no-deps, as the device tool advises: the
    image's own packages stay as they are) and put it on the path of this process and its stage children."""
    wheels = sorted(str(p) for p in WHEELS.glob("*.whl")) if WHEELS.is_dir() else []
    if not wheels:
        return "no .whl/ carried"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                          "--upgrade", "--target", str(SITE), *wheels], capture_output=True, text=True)
    if res.returncode != 0:
        return "pip failed: " + (res.stderr.strip().splitlines() or [""])[-1][:200]
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(SITE), os.environ.get("PYTHONPATH")) if p)
    sys.path.insert(0, str(SITE))
    return f"{len(wheels)} wheels installed"


def _install_stage() -> None:
    """What imports after the carried wheels were installed: a stage whose module is missing skips with this."""
    for module in IMPORTS:
        try:
            __import__(module)
            emit(f"have_{module}", True)
        except Exception as e:  # ImportError, or a build that fails on this machine
            emit(f"have_{module}", False, note=f"{type(e).__name__}: {str(e)[:120]}", status="skipped")


STAGES: dict[str, tuple[Callable[[str], None], int, str]] = {
    "install": (lambda preset: _install_stage(), 15, "which packages import after the carried wheels"),
    "kernels": (lambda preset: _kernels_stage(), 60, "kernel tests on compiled Triton"),
    "db": (lambda preset: _epoch_stage(preset, ["dag.algorithm=db", "engine.backend=deepspeed",
                                                 "engine.zero_stage=2"]), 90, "DAG-DB epoch, bf16, ZeRO-2"),
    "kl": (lambda preset: _epoch_stage(preset, ["dag.algorithm=kl", "engine.backend=deepspeed",
                                                 "engine.zero_stage=2"]), 90, "DAG-KL epoch, bf16, ZeRO-2"),
    "attention": (_attention_stage, 30, "rollout with SDPA vs xformers"),
    "adamw8bit": (_adamw8bit_stage, 15, "epoch with bitsandbytes AdamW8bit"),
    "throughput": (_throughput_stage, 180, "throughput suite rows, CUDA graphs on/off"),
}


# ----- the parent: plan, run, record -----------------------------------------------------------------------------
def plan(preset: str, stages: Sequence[str]) -> list[str]:
    from fastdag.config import load_config

    cfg = load_config(None, [*SIZES[preset], *EPOCH])
    lines = [f"gpu-check plan, preset {preset}: {cfg.model.pretrained} ({cfg.model.dtype}), "
             f"{cfg.trajectories_per_epoch} trajectories x {cfg.sample.num_steps} steps per epoch, "
             f"{cfg.trajectories_per_epoch * cfg.trained_timesteps} trained transitions"]
    if preset == "sd15":
        from fastdag.families.presets import sd15_parameter_counts

        counts = sd15_parameter_counts()
        lines.append("model parameters: " + ", ".join(f"{k} {v / 1e6:.0f} M" for k, v in counts.items()))
    wheels = sorted(p.name for p in WHEELS.glob("*")) if WHEELS.is_dir() else []
    lines.append(f"carried wheels in .whl/: {len(wheels)} ({sum(p.stat().st_size for p in WHEELS.glob('*')) / 2**20:.1f}"
                 f" MiB)" if wheels else "carried wheels in .whl/: none (run --prepare-wheels on a machine with PyPI)")
    total = 0
    for name in stages:
        _, limit, what = STAGES[name]
        total += limit
        lines.append(f"  {name:<11} <= {limit:>3} s  {what}")
    lines.append(f"worst case {total} s; results: {RESULTS.relative_to(harness.REPO_ROOT)}, "
                 f"{SUMMARY.relative_to(harness.REPO_ROOT)}")
    return lines


def run_stage(name: str, preset: str, limit: Optional[int] = None) -> tuple[str, list[dict[str, Any]], float]:
    """(status, result rows, seconds) of one stage in a child process under its time limit (default: the stage's)."""
    limit = limit or STAGES[name][1]
    t0 = time.perf_counter()
    try:
        res = subprocess.run([sys.executable, "-m", "fastdag.bench.gpu_check", "--stage", name, "--preset", preset],
                             cwd=harness.REPO_ROOT, capture_output=True, text=True, timeout=limit)
        out, code = res.stdout, res.returncode
        err = (res.stderr.strip().splitlines() or [""])[-1]
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        code, err = None, f"timed out after {limit} s"
    rows = [json.loads(line[len(MARK):]) for line in out.splitlines() if line.startswith(MARK)]
    status = "ok" if code == 0 and all(r["status"] != "failed" for r in rows) else "failed"
    if code == 0 and rows and all(r["status"] == "skipped" for r in rows):
        status = "skipped"
    if status == "failed":
        rows.append({"metric": "error", "value": "", "unit": "", "note": err[:300], "status": "failed"})
    return status, rows, time.perf_counter() - t0


def _environment() -> dict[str, str]:
    import torch

    env = harness.environment("cuda")
    driver = ""
    try:
        import pynvml

        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
    except Exception:  # no pynvml, or NVML fails to initialise
        driver = f"cuda {torch.version.cuda}"
    versions = {}
    for module in ("diffusers", "deepspeed"):
        try:
            versions[f"{module}_version"] = __import__(module).__version__
        except ImportError:
            versions[f"{module}_version"] = "none"
    return {k: env[k] for k in ("timestamp", "git_revision", "hardware", "torch_version", "triton_version")} | \
        {"driver": str(driver), **versions}


def write_summary(path: Path, env: dict[str, str], results: list[tuple[str, str, float, list[dict]]]) -> None:
    lines = [f"# GPU check — {env['hardware']}", "",
             f"{env['timestamp']}, git {env['git_revision']}, driver {env['driver']}, torch {env['torch_version']}, "
             f"triton {env['triton_version']}, diffusers {env['diffusers_version']}, deepspeed "
             f"{env['deepspeed_version']}", "", "| stage | status | seconds | results |", "|---|---|---:|---|"]
    for name, status, seconds, rows in results:
        shown = "; ".join(f"{r['metric']} {r['value']}{(' ' + r['unit']) if r['unit'] else ''}"
                          f"{(' (' + r['note'] + ')') if r['note'] else ''}" for r in rows[:12])
        lines.append(f"| {name} | {status} | {seconds:.0f} | {shown} |")
    path.write_text("\n".join(lines) + "\n")


def prepare_wheels(optional: bool) -> int:
    """Download (or build) the carried wheels for the GPU image: CPython 3.12, manylinux x86-64."""
    WHEELS.mkdir(exist_ok=True)
    platforms = [a for tag in ("manylinux_2_28", "manylinux_2_24", "manylinux_2_17", "manylinux2014")
                 for a in ("--platform", f"{tag}_x86_64")]
    for requirement in carried_pins(optional):
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(WHEELS), "--only-binary=:all:",
               "--python-version", "3.12", "--implementation", "cp", *platforms, requirement]
        if subprocess.run(cmd).returncode != 0:  # sdist-only packages (deepspeed): a pure-Python wheel built here
            subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                            str(WHEELS), requirement])
    size = sum(p.stat().st_size for p in WHEELS.glob("*")) / 2**20
    print(f"gpu-check: {len(list(WHEELS.glob('*')))} files, {size:.1f} MiB in {WHEELS} (the device tool carries "
          f"at most 64 MiB: carry=['.whl'])")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="fastdag bench gpu-check", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="print the plan and its sizes; needs no GPU")
    p.add_argument("--prepare-wheels", action="store_true", help="fill .whl/ with the wheels the GPU image lacks")
    p.add_argument("--with-bitsandbytes", action="store_true", help="--prepare-wheels: bitsandbytes too (43 MB)")
    p.add_argument("--preset", choices=sorted(SIZES), default="sd15", help="model size (tiny: a quick check)")
    p.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES), help="stages to run")
    p.add_argument("--stage", choices=list(STAGES), help=argparse.SUPPRESS)  # a child process runs one stage
    args = p.parse_args(argv)
    if args.stage:
        STAGES[args.stage][0](args.preset)
        return 0
    if args.prepare_wheels:
        return prepare_wheels(args.with_bitsandbytes)
    if args.dry_run:
        print("\n".join(plan(args.preset, args.stages)))
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; it runs on a machine with one GPU (--dry-run shows the plan)",
              file=sys.stderr)
        return 2
    print("\n".join(plan(args.preset, args.stages)), flush=True)
    print(f"gpu-check: carried wheels: {install_carried()}", flush=True)
    results, start = [], time.perf_counter()
    for name in args.stages:
        if time.perf_counter() - start + STAGES[name][1] > BUDGET_SECONDS:  # the lease is short: never overrun it
            results.append((name, "skipped", 0.0, [{"metric": name, "value": "", "unit": "", "status": "skipped",
                                                     "note": f"would pass the {BUDGET_SECONDS} s budget"}]))
            continue
        status, rows, seconds = run_stage(name, args.preset)
        print(f"gpu-check: {name}: {status} in {seconds:.0f} s", flush=True)
        results.append((name, status, seconds, rows))
    env, run_id = _environment(), f"{int(time.time()):x}"
    harness.append_rows(RESULTS, [{**env, "run_id": run_id, "stage": name, **row}
                                  for name, _, _, rows in results for row in rows], FIELDS)
    write_summary(SUMMARY, env, results)
    print(f"gpu-check: results in {RESULTS} and {SUMMARY}")
    return 0 if all(status != "failed" for _, status, _, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
