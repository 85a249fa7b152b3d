"""fastdag bench sample-efficiency on the tiny preset: every algorithm and seed trains the same budget, is
evaluated at the same budgets (the base model at 0), and the chart and the summary come from the CSV."""
import csv
from collections import Counter
from pathlib import Path

from fastdag.bench.sample_efficiency import main

REPO_CONFIG = "configs/tiny_random_compress.yaml"


def test_equal_budgets_evaluations_and_reports(tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    results = tmp_path / "se.csv"
    main(["--config", REPO_CONFIG, "--algorithms", "db", "grpo", "g4=grpo", "--seeds", "0", "1", "--trajectories", "16",
          "--evals", "2", "--set", "grpo:sample.group_size=2", "--set", "g4:sample.group_size=4", "--eval-prompts", "tiny", "--runs", str(tmp_path / "runs"),
          "--results", str(results), "--chart", str(tmp_path / "se.png"), "--summary", str(tmp_path / "se.md"),
          "reward.name=brightness", "sample.num_steps=4", "train.batch_size=4", "engine.backend=torch",
          "eval.samples_per_prompt=1", "eval.num_steps=2", "logging.grid_size=0"])
    rows = list(csv.DictReader(open(results)))
    evals = Counter((r["algorithm"], r["seed"], r["trajectories"]) for r in rows
                    if r["kind"] == "eval" and r["metric"] == "reward")
    # base (0), half (8) and all (16) of the budget, for each algorithm and seed
    labels = ("db", "grpo", "g4")  # g4: a labelled variant of grpo, with its own settings
    assert sorted(evals) == sorted((a, s, t) for a in labels for s in ("0", "1") for t in ("0", "8", "16"))
    train = [r for r in rows if r["kind"] == "train"]
    assert {(r["algorithm"], r["seed"], r["trajectories"]) for r in train} == \
        {(a, s, t) for a in labels for s in ("0", "1") for t in ("8", "16")}
    assert (tmp_path / "runs/g4-seed0/config.yaml").read_text().count("group_size: 4") == 1
    assert (tmp_path / "se_eval.png").stat().st_size > 1000  # the evaluation curves with bands
    base = {r["algorithm"]: r["value"] for r in rows if r["kind"] == "eval" and r["trajectories"] == "0"
            and r["metric"] == "reward" and r["seed"] == "0"}
    assert base["db"] == base["grpo"]  # the same base model, evaluated once
    assert (tmp_path / "se.png").stat().st_size > 1000
    md = (tmp_path / "se.md").read_text()
    assert "| db | 16 |" in md and "| grpo | 8 |" in md and "wall seconds" in md and "needed to reach" in md


def _row(algorithm, seed, trajectories, kind, metric, value):
    return {"algorithm": algorithm, "seed": str(seed), "trajectories": str(trajectories), "kind": kind,
            "metric": metric, "value": str(value)}


def test_reach_and_hacking_tables_from_rows():
    from fastdag.bench.sample_efficiency import hacking_lines, reach_lines

    rows = []
    for seed in (0, 1):
        # a reaches 0.6 taste at 100 trajectories and ends at 0.8; b creeps to 0.4 and its realism falls.
        for t, (ta, tb) in {0: (0.1, 0.1), 100: (0.6, 0.2), 200: (0.8, 0.4)}.items():
            rows += [_row("a", seed, t, "eval", "taste_rate", ta), _row("b", seed, t, "eval", "taste_rate", tb),
                     _row("a", seed, t, "eval", "realism", 0.95), _row("b", seed, t, "eval", "realism", 0.95 - t / 1000)]
        for epoch in range(1, 11):
            rows += [_row("a", seed, epoch * 20, "train", "reward_mean", -1 + epoch / 20),
                     _row("b", seed, epoch * 20, "train", "reward_mean", -1 + epoch / 10)]
    reach = "\n".join(reach_lines(rows, "taste_rate"))
    assert "| a | 200 | 100 |" in reach  # a needs 200 to reach its own 0.8, 100 to reach b's 0.4
    assert "| b | — | 200 |" in reach  # b never reaches a's 0.8
    hacking = "\n".join(hacking_lines(rows))
    assert "| a |" in hacking and "0.950 → 0.950 | no |" in hacking
    assert "0.950 → 0.750 | yes |" in hacking  # b's reward rose while the judge's realism fell 20 points
