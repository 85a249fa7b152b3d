"""fastdag benchmarks: one harness (``fastdag.bench.harness``), results appended to ``docs/results/bench/*.csv``."""
