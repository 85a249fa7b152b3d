"""python -m benchmarks sample-efficiency on the tiny preset: every algorithm and seed trains the same budget, is
evaluated at the same budgets (the base model at 0), and the chart and the summary come from the CSV."""
import csv
from collections import Counter
from pathlib import Path

from benchmarks.sample_efficiency import main

REPO_CONFIG = "configs/tiny_random_compress.yaml"


def test_equal_budgets_evaluations_and_reports(tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    results = tmp_path / "se.csv"
    main(["--config", REPO_CONFIG, "--algorithms", "db", "grpo", "--seeds", "0", "1", "--trajectories", "16",
          "--evals", "2", "--set", "grpo:sample.group_size=2", "--eval-prompts", "tiny", "--runs", str(tmp_path / "runs"),
          "--results", str(results), "--chart", str(tmp_path / "se.png"), "--summary", str(tmp_path / "se.md"),
          "reward.name=brightness", "sample.num_steps=4", "train.batch_size=4", "engine.backend=torch",
          "eval.samples_per_prompt=1", "eval.num_steps=2", "logging.grid_size=0"])
    rows = list(csv.DictReader(open(results)))
    evals = Counter((r["algorithm"], r["seed"], r["trajectories"]) for r in rows
                    if r["kind"] == "eval" and r["metric"] == "reward")
    # base (0), half (8) and all (16) of the budget, for each algorithm and seed
    assert sorted(evals) == sorted((a, s, t) for a in ("db", "grpo") for s in ("0", "1") for t in ("0", "8", "16"))
    train = [r for r in rows if r["kind"] == "train"]
    assert {(r["algorithm"], r["seed"], r["trajectories"]) for r in train} == \
        {(a, s, t) for a in ("db", "grpo") for s in ("0", "1") for t in ("8", "16")}
    base = {r["algorithm"]: r["value"] for r in rows if r["kind"] == "eval" and r["trajectories"] == "0"
            and r["metric"] == "reward" and r["seed"] == "0"}
    assert base["db"] == base["grpo"]  # the same base model, evaluated once
    assert (tmp_path / "se.png").stat().st_size > 1000
    md = (tmp_path / "se.md").read_text()
    assert "| db | 16 |" in md and "| grpo | 8 |" in md and "wall seconds" in md
