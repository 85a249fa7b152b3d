"""fastdag benchmarks: one harness (``benchmarks.harness``), results appended to ``benchmarks/results/*.csv``."""
