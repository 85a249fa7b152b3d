"""Kernel benchmark: the fused DDIM step (scoring mode) against its PyTorch reference, eager and compiled.

    python -m fastdag.bench.bench_kernels                       # SD-1.5 latents: B in 8 16 32, 4×64×64, bf16
    python -m fastdag.bench.bench_kernels --backward            # forward + backward rows as well
    python -m fastdag.bench.bench_kernels --batch-sizes 2 --no-compile   # a quick CPU run

Providers: ``reference`` (``ddim_step_reference`` eager), ``reference_compile`` (the same under torch.compile)
and ``triton`` (``ddim_step_triton``; CUDA only: on a CPU it is skipped with a message). Each row reports the
median time with its 20–80 % spread, the effective bandwidth of the fused kernel's minimal traffic (see
:func:`ddim_step_bytes`; the same byte count for every provider, so GB/s compares like with like) and its
fraction of the device's measured copy bandwidth. Rows are appended to ``docs/results/bench/kernels.csv``.
"""
from __future__ import annotations

import argparse
import math
from typing import Callable, Optional, Sequence

import torch

from fastdag.bench import harness
from fastdag.kernels._compat import HAS_TRITON
from fastdag.kernels.ddim_step import ddim_step_reference, ddim_step_triton

BENCHMARK = "ddim_step"
DEFAULT_RESULTS = harness.RESULTS_DIR / "kernels.csv"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def ddim_step_bytes(batch: int, numel_per_sample: int, itemsize: int, backward: bool) -> int:
    """Minimal DRAM traffic of the fused scoring step: the forward reads eps, x_t, x_prev and writes x0_pred (plus
    [B] alphas in and log_pf, log_pb out); the backward reads eps, x_t, x_prev and ∂L/∂x0_pred and writes ∂L/∂eps
    (μ is recomputed, not stored)."""
    n = batch * numel_per_sample * itemsize
    per_sample = batch * 4  # one fp32 value per sample
    forward = 4 * n + 4 * per_sample
    return forward + (5 * n + 3 * per_sample if backward else 0)


def _step_fn(
    step: Callable,
    batch: int,
    shape: Sequence[int],
    dtype: torch.dtype,
    device: torch.device,
    reduce: str,
    backward: bool,
) -> Callable[[], object]:
    """A closure running one scoring step (and its backward) on fresh SD-like inputs [B, *shape]."""
    size = (batch, *shape)
    eps = torch.randn(size, device=device, dtype=dtype, requires_grad=backward)
    x_t = torch.randn(size, device=device, dtype=dtype)
    x_prev = torch.randn(size, device=device, dtype=dtype)
    # ᾱ around the middle of SD's 1000-step schedule, per sample as in a shuffled training minibatch.
    alpha_t = torch.linspace(0.3, 0.6, batch, device=device)
    alpha_prev = alpha_t + 0.02
    grad_x0 = torch.randn(size, device=device, dtype=dtype)
    grad_log_pf = torch.randn(batch, device=device)

    def run() -> object:
        out = step(eps, x_t, alpha_t, alpha_prev, 1.0, x_prev=x_prev, reduce=reduce)
        if backward:
            torch.autograd.backward((out.log_pf, out.x0_pred), (grad_log_pf, grad_x0))
            eps.grad = None
        return out

    return run


def _providers(device: torch.device, compile_reference: bool) -> list[tuple[str, Callable]]:
    providers: list[tuple[str, Callable]] = [("reference", ddim_step_reference)]
    if compile_reference:
        providers.append(("reference_compile", torch.compile(ddim_step_reference, dynamic=False)))
    if device.type == "cuda" and HAS_TRITON:
        providers.append(("triton", ddim_step_triton))
    else:
        reason = "no CUDA device" if device.type != "cuda" else "Triton is not installed"
        print(f"[bench_kernels] skipping provider 'triton': the Triton path needs a GPU ({reason}).")
    return providers


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32], help="batch sizes B")
    parser.add_argument("--shape", type=int, nargs="+", default=[4, 64, 64], help="latent shape per sample (C H W)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="dtype of eps, x_t, x_prev")
    parser.add_argument("--reduce", choices=["mean", "sum"], default="mean")
    parser.add_argument("--backward", action="store_true", help="also time forward + backward (∂/∂eps)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd reference")
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls before timing (compilation included)")
    parser.add_argument("--repeat", type=int, default=50, help="timed calls")
    parser.add_argument("--copy-mib", type=int, default=None, help="buffer size for the copy-bandwidth probe")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--results", default=str(DEFAULT_RESULTS), help="CSV the rows are appended to")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    env = harness.environment(device)
    copy_bytes = args.copy_mib << 20 if args.copy_mib is not None else None
    copy_gbps = harness.measure_copy_bandwidth(device, copy_bytes)
    print(f"[bench_kernels] {env['hardware']} | torch {env['torch_version']} | triton {env['triton_version']} | "
          f"git {env['git_revision']} | copy bandwidth {copy_gbps:.1f} GB/s")  # fmt: skip
    modes = [("forward", False)] + ([("forward_backward", True)] if args.backward else [])
    shape_str = "x".join(map(str, args.shape))
    providers = _providers(device, not args.no_compile)
    rows = []
    print(f"{'provider':<18} {'mode':<17} {'B':>4} {'median ms':>10} {'p20–p80 ms':>17} {'GB/s':>8} {'% copy':>7}")
    for provider, step in providers:
        for mode, backward in modes:
            for batch in args.batch_sizes:
                run = _step_fn(step, batch, args.shape, dtype, device, args.reduce, backward)
                timing = harness.time_fn(run, device, warmup=args.warmup, repeat=args.repeat)
                nbytes = ddim_step_bytes(batch, math.prod(args.shape), dtype.itemsize, backward)
                row = harness.result_row(
                    env, benchmark=BENCHMARK, provider=provider, mode=mode, x_name="batch", x_value=batch,
                    config=f"shape={shape_str} dtype={args.dtype} reduce={args.reduce} scoring",
                    timing=timing, nbytes=nbytes, copy_gbps=copy_gbps,
                )  # fmt: skip
                rows.append(row)
                print(f"{provider:<18} {mode:<17} {batch:>4} {timing.median_ms:>10.3f} "
                      f"{timing.p20_ms:>8.3f}–{timing.p80_ms:<8.3f} {float(row['gbps']):>8.2f} "
                      f"{100 * float(row['frac_of_copy_bw']):>6.2f}%")  # fmt: skip
    path = harness.append_rows(args.results, rows)
    print(f"[bench_kernels] appended {len(rows)} rows to {path}")
    return rows


if __name__ == "__main__":
    main()
