"""The kernel benchmark runs on CPU (reference providers only) and appends well-formed rows to its CSV."""
import csv

import pytest

from fastdag.bench import bench_kernels, harness


def test_bench_kernels_cpu_tiny(tmp_path, capsys):
    results = tmp_path / "kernels.csv"
    argv = ["--device", "cpu", "--batch-sizes", "2", "3", "--shape", "4", "8", "8", "--no-compile", "--backward",
            "--warmup", "1", "--repeat", "3", "--copy-mib", "4", "--results", str(results)]  # fmt: skip
    bench_kernels.main(argv)
    bench_kernels.main(argv)  # a second run appends below the same header
    assert "Triton path needs a GPU" in capsys.readouterr().out

    with open(results, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 2  # runs × modes × batch sizes, provider "reference" only
    assert {(r["provider"], r["mode"]) for r in rows} == {("reference", "forward"), ("reference", "forward_backward")}
    for row in rows:
        assert set(row) == set(harness.RESULT_FIELDS)
        assert row["benchmark"] == "ddim_step" and row["x_name"] == "batch" and row["device"] == "cpu"
        assert row["hardware"] and row["torch_version"] and row["git_revision"] and row["timestamp"]
        assert float(row["p20_ms"]) <= float(row["median_ms"]) <= float(row["p80_ms"])
        assert float(row["gbps"]) > 0 and float(row["copy_gbps"]) > 0 and float(row["frac_of_copy_bw"]) > 0
        batch, backward = int(row["x_value"]), row["mode"] == "forward_backward"
        assert int(row["bytes"]) == bench_kernels.ddim_step_bytes(batch, 4 * 8 * 8, 2, backward)


def test_append_rows_refuses_a_foreign_header(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="columns"):
        harness.append_rows(path, [])


def test_time_fn_reports_ordered_quantiles():
    calls = []
    timing = harness.time_fn(lambda: calls.append(1), "cpu", warmup=2, repeat=5, flush_bytes=1 << 10)
    assert len(calls) == 7 and timing.repeats == 5
    assert timing.min_ms <= timing.p20_ms <= timing.median_ms <= timing.p80_ms


def test_bench_xhat_modes_runs_on_cpu(tmp_path):
    from fastdag.bench import bench_xhat_modes

    summary = bench_xhat_modes.main([
        "--epochs", "1", "--results", str(tmp_path / "epochs.csv"), "sample.num_steps=3", "sample.batch_size=4",
        "train.batch_size=4",
    ])
    assert summary["rollout"]["first_epoch_reward"] == summary["recompute"]["first_epoch_reward"]
    assert summary["ratio"]["recompute_over_rollout"] > 0
    assert len((tmp_path / "epochs.csv").read_text().splitlines()) == 3
