"""fastdag bench gpu-check on a CPU: the dry run prints the plan and sizes; the real run refuses in one line."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(*args):
    return subprocess.run([sys.executable, "-m", "fastdag.bench", "gpu-check", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_dry_run_prints_the_plan_with_sizes():
    res = run("--dry-run", "--preset", "tiny")
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    assert "tiny-random" in out and "8 trajectories x 10 steps" in out and "80 trained transitions" in out
    for stage in ("install", "kernels", "db", "kl", "attention", "adamw8bit", "throughput"):
        assert f"  {stage} " in out, stage
    limits = sum(int(line.split("<=")[1].split("s")[0]) for line in out.splitlines() if "<=" in line)
    assert limits <= 8 * 60  # the stages' limits add up to at most the 8-minute budget
    sd15 = run("--dry-run")
    assert sd15.returncode == 0 and "unet 860 M" in sd15.stdout and "400 trained transitions" in sd15.stdout


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA machine would run the check")
def test_without_cuda_it_exits_2_with_one_line():
    res = run("--preset", "tiny", "--stages", "db")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "no CUDA device" in res.stderr


def test_stage_protocol_on_the_cpu(capsys):
    """A stage child process reports result lines the parent parses; the epoch stage's body runs here in-process
    (the torch engine: DeepSpeed's start alone takes a minute on this CPU)."""
    import json

    from fastdag.bench.gpu_check import MARK, _epoch_stage, run_stage

    status, rows, _ = run_stage("install", "tiny", limit=300)
    assert status == "ok" and {r["metric"] for r in rows} >= {"have_diffusers", "have_deepspeed"}, rows
    _epoch_stage("tiny", ["dag.algorithm=kl", "engine.backend=torch"])
    lines = [json.loads(line[len(MARK):]) for line in capsys.readouterr().out.splitlines() if line.startswith(MARK)]
    metrics = {r["metric"]: r["value"] for r in lines}
    assert metrics["finite"] is True and metrics["rollout_seconds"] > 0 and "kl_loss" in metrics
