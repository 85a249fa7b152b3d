"""The benchmark harness shared by every fastdag benchmark: timing, hardware and version info, result rows.

Timing excludes warm-up, synchronises the device before reading clocks (CUDA events on GPU), flushes the
last-level cache between repetitions (so bandwidth numbers are DRAM numbers, not cache hits) and reports the
median with the 20th/80th percentiles. Rows are appended to one CSV per suite with the hardware, torch/triton
versions, git revision and a timestamp, so charts can be drawn from the file alone.
"""
from __future__ import annotations

import csv
import datetime
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO_ROOT / "docs" / "results" / "bench"

RESULT_FIELDS = (
    "timestamp",
    "git_revision",
    "hardware",
    "device",
    "torch_version",
    "triton_version",
    "benchmark",
    "provider",
    "mode",
    "x_name",
    "x_value",
    "config",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "repeats",
    "bytes",
    "gbps",
    "copy_gbps",
    "frac_of_copy_bw",
)


@dataclass(frozen=True)
class Timing:
    """Wall time of one call, in milliseconds, over ``repeats`` timed calls (warm-up excluded)."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    repeats: int


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_flusher(device: torch.device, flush_bytes: int) -> Callable[[], None]:
    if flush_bytes <= 0:
        return lambda: None
    buffer = torch.empty(flush_bytes // 4, dtype=torch.int32, device=device)  # [flush_bytes / 4]
    return buffer.zero_


def time_fn(
    fn: Callable[[], Any],
    device: Union[torch.device, str],
    warmup: int = 5,
    repeat: int = 20,
    flush_bytes: Optional[int] = None,
) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls (compilation, autotuning, allocator), then ``repeat`` timed calls.

    ``flush_bytes`` of memory are overwritten before every timed call, outside the timed region; the default is
    256 MiB on CUDA (more than any current L2) and 64 MiB on CPU. On CUDA each call is bracketed by events and
    read after one final synchronisation; on CPU by ``time.perf_counter``.
    """
    device = torch.device(device)
    if flush_bytes is None:
        flush_bytes = (256 if device.type == "cuda" else 64) << 20
    flush = _cache_flusher(device, flush_bytes)
    for _ in range(warmup):
        fn()
    synchronize(device)
    times_ms: list[float] = []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeat)]
        for start, end in events:
            flush()
            start.record()
            fn()
            end.record()
        synchronize(device)
        times_ms = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(repeat):
            flush()
            synchronize(device)
            start_s = time.perf_counter()
            fn()
            synchronize(device)
            times_ms.append((time.perf_counter() - start_s) * 1e3)
    quantiles = statistics.quantiles(times_ms, n=5, method="inclusive") if len(times_ms) > 1 else times_ms * 4
    return Timing(statistics.median(times_ms), quantiles[0], quantiles[3], min(times_ms), len(times_ms))


def measure_copy_bandwidth(
    device: Union[torch.device, str], nbytes: Optional[int] = None, warmup: int = 3, repeat: int = 10
) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + written), the practical ceiling of a
    bandwidth-bound kernel. ``nbytes`` per buffer defaults to 1 GiB on CUDA and 256 MiB on CPU."""
    device = torch.device(device)
    if nbytes is None:
        nbytes = (1024 if device.type == "cuda" else 256) << 20
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)  # [nbytes / 4]
    dst = torch.empty_like(src)
    # The buffers are far larger than any cache, so no flush is needed.
    timing = time_fn(lambda: dst.copy_(src), device, warmup=warmup, repeat=repeat, flush_bytes=0)
    return gbps(2 * nbytes, timing.median_ms)


def measure_matmul_tflops(
    device: Union[torch.device, str], dtype: torch.dtype, n: Optional[int] = None, warmup: int = 3, repeat: int = 10
) -> float:
    """The device's measured dense matmul rate in TFLOP/s (2·n³ per n×n×n product): the denominator of MFU.
    ``n`` defaults to 8192 on CUDA and 1024 on CPU."""
    device = torch.device(device)
    if n is None:
        n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)  # [n, n]
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    timing = time_fn(lambda: torch.mm(a, b, out=out), device, warmup=warmup, repeat=repeat, flush_bytes=0)
    return 2 * n**3 / (timing.median_ms * 1e-3) / 1e12


def gbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def hardware_name(device: Union[torch.device, str]) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def versions() -> dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {"torch_version": torch.__version__, "triton_version": triton_version}


GIT_REVISION_ENV = "FASTDAG_GIT_REVISION"


def git_revision() -> str:
    """The code's revision: ``$FASTDAG_GIT_REVISION`` when set (a copied tree without ``.git``, e.g. on a lent GPU
    machine, gets it from the command that launched it), else the short HEAD revision, else ``unknown``."""
    passed = os.environ.get(GIT_REVISION_ENV, "").strip()
    if passed:
        return passed
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else "unknown"


def environment(device: Union[torch.device, str]) -> dict[str, str]:
    """The columns shared by every row of one run: when, which code, which machine."""
    return {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_revision": git_revision(),
        "hardware": hardware_name(device),
        "device": str(torch.device(device)),
        **versions(),
    }


def result_row(
    env: dict[str, str],
    *,
    benchmark: str,
    provider: str,
    mode: str,
    x_name: str,
    x_value: Union[int, float, str],
    config: str,
    timing: Timing,
    nbytes: Optional[int] = None,
    copy_gbps: Optional[float] = None,
) -> dict[str, Any]:
    """One CSV row. ``nbytes`` is the minimal traffic of one call; with it come GB/s and, given the measured copy
    bandwidth, the fraction of it reached."""
    achieved = gbps(nbytes, timing.median_ms) if nbytes else None
    row: dict[str, Any] = {
        **env,
        "benchmark": benchmark,
        "provider": provider,
        "mode": mode,
        "x_name": x_name,
        "x_value": x_value,
        "config": config,
        **{k: v for k, v in asdict(timing).items() if k != "min_ms"},
        "bytes": nbytes if nbytes is not None else "",
        "gbps": f"{achieved:.4g}" if achieved is not None else "",
        "copy_gbps": f"{copy_gbps:.4g}" if copy_gbps is not None else "",
        "frac_of_copy_bw": f"{achieved / copy_gbps:.4g}" if achieved is not None and copy_gbps else "",
    }
    for key in ("median_ms", "p20_ms", "p80_ms"):
        row[key] = f"{row[key]:.5g}"
    return row


def append_rows(
    path: Union[str, os.PathLike], rows: Iterable[dict[str, Any]], fields: Sequence[str] = RESULT_FIELDS
) -> Path:
    """Append rows to a CSV with the header ``fields`` (default ``RESULT_FIELDS``), writing the header if the
    file is new; a file with another header is refused."""
    fields = tuple(fields)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size > 0:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if tuple(header) != fields:
            raise ValueError(f"{path} has columns {header}, expected {list(fields)}; use a new results file")
        new_file = False
    else:
        new_file = True
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new_file:
            writer.writeheader()
        writer.writerows(rows)
    return path
