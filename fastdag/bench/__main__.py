"""``fastdag bench COMMAND [...]`` (or ``python -m fastdag.bench``): the benchmark suite's one entry point.

    fastdag bench tiny [--epochs N] [key=value ...]     # throughput suite, CPU-sized preset
    fastdag bench sd15 [--epochs N] [key=value ...]     # throughput suite, SD 1.5 architecture (GPU)
    fastdag bench tiny-sd3 | tiny-flux | tiny-sdxl      # a CPU row per family; sd35m, flux-dev on a GPU
    fastdag bench report [--results R] [--chart C] [--summary S]
    fastdag bench kernels [...]                         # fastdag.bench.bench_kernels
    fastdag bench xhat-modes [...]                      # fastdag.bench.bench_xhat_modes
    fastdag bench gradient-signal [...]                 # signal vs noise in one epoch's DB gradient
    fastdag bench precision [...]                       # bf16 vs fp32 terms and gradients, same trajectories
    fastdag bench gpu-check [--dry-run | --rehearse | --prepare-wheels]  # all that needs a GPU, one command
    fastdag bench sample-efficiency --config C [...]    # algorithms at equal trajectory budgets
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from fastdag.bench.throughput import PRESETS

    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command in PRESETS:
        from fastdag.bench import throughput

        throughput.main(argv)
    elif command == "report":
        from fastdag.bench import report

        report.main(rest)
    elif command == "kernels":
        from fastdag.bench import bench_kernels

        bench_kernels.main(rest)
    elif command == "xhat-modes":
        from fastdag.bench import bench_xhat_modes

        bench_xhat_modes.main(rest)
    elif command == "sample-efficiency":
        from fastdag.bench import sample_efficiency

        return sample_efficiency.main(rest)
    elif command == "gpu-check":
        from fastdag.bench import gpu_check

        return gpu_check.main(rest)
    elif command == "precision":
        from fastdag.bench import precision

        return precision.main(rest)
    elif command == "gradient-signal":
        from fastdag.bench import gradient_signal

        gradient_signal.main(rest)
    else:
        print(f"unknown command {command!r}\n{__doc__}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
