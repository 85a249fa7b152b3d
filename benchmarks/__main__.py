"""``python -m benchmarks PRESET|report|kernels|xhat-modes [...]``: the benchmark suite's one entry point.

    python -m benchmarks tiny [--epochs N] [key=value ...]     # throughput suite, CPU-sized preset
    python -m benchmarks sd15 [--epochs N] [key=value ...]     # throughput suite, SD 1.5 architecture (GPU)
    python -m benchmarks report [--results R] [--chart C] [--summary S]
    python -m benchmarks kernels [...]                         # benchmarks.bench_kernels
    python -m benchmarks xhat-modes [...]                      # benchmarks.bench_xhat_modes
    python -m benchmarks gradient-signal [...]                 # signal vs noise in one epoch's DB gradient
    python -m benchmarks gpu-check [--dry-run | --prepare-wheels]  # everything that needs a GPU, one command
    python -m benchmarks sample-efficiency --config C [...]    # algorithms at equal trajectory budgets
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from benchmarks.throughput import PRESETS

    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command in PRESETS:
        from benchmarks import throughput

        throughput.main(argv)
    elif command == "report":
        from benchmarks import report

        report.main(rest)
    elif command == "kernels":
        from benchmarks import bench_kernels

        bench_kernels.main(rest)
    elif command == "xhat-modes":
        from benchmarks import bench_xhat_modes

        bench_xhat_modes.main(rest)
    elif command == "sample-efficiency":
        from benchmarks import sample_efficiency

        return sample_efficiency.main(rest)
    elif command == "gpu-check":
        from benchmarks import gpu_check

        return gpu_check.main(rest)
    elif command == "gradient-signal":
        from benchmarks import gradient_signal

        gradient_signal.main(rest)
    else:
        print(f"unknown command {command!r}\n{__doc__}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
