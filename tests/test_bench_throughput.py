"""The throughput suite on CPU (tiny preset, minimal steps), its report from a CSV, and the sd15 preset's configs."""
import csv

import pytest
import torch

from fastdag.bench import harness, report, throughput


def test_suite_tiny_preset_writes_rows_chart_and_summary(tmp_path, capsys):
    results, chart, summary_md = tmp_path / "t.csv", tmp_path / "t.png", tmp_path / "t.md"
    out = throughput.main(["tiny", "--epochs", "1", "--repeat", "2", "--results", str(results), "--chart", str(chart),
                           "--summary", str(summary_md), "sample.num_steps=3", "train.timesteps_per_micro_step=3",
                           "sample.batch_size=4", "train.batch_size=4"])
    printed = capsys.readouterr().out
    assert "CUDA graphs need a GPU" in printed and "official / fastdag epoch time" in printed
    with open(results, newline="") as f:
        rows = list(csv.DictReader(f))
    assert all(tuple(r) == throughput.THROUGHPUT_FIELDS for r in rows)
    assert {r["run_id"] for r in rows} == {out["run"]["run_id"]} and all(r["git_revision"] for r in rows)
    for mode in ("fastdag", "official"):
        m = out[mode]
        for key in ("epoch_seconds", "rollout_traj_per_s", "update_transitions_per_s", "peak_memory_mib", "mfu",
                    "flops_per_epoch", "phase_s.rollout.unet", "phase_s.update.backward", "phase_s.update.host"):
            assert key in m and m[key] >= 0, (mode, key)
        assert m["flops_per_epoch"] > 0 and 0 < m["mfu"] < 1
    assert out["official"]["same_first_epoch_rewards"] == 1.0
    # official rescoring per transition: 2 x̂_0 images per trained transition instead of one per state
    assert out["official"]["images_scored_per_epoch"] > out["fastdag"]["images_scored_per_epoch"]
    assert out["official"]["phase_s.update.decode"] > 0 and out["fastdag"]["phase_s.update.decode"] == 0
    assert out["device"]["matmul_tflops"] > 0 and out["fastdag"]["unet_only_traj_per_s"] > 0
    assert chart.read_bytes()[:4] == b"\x89PNG"
    text = summary_md.read_text()
    assert "## tiny" in text and "| fastdag |" in text and "official-cost / fastdag" in text


def _rows(run_id, preset, mode_values):
    env = {"timestamp": "2026-01-01T00:00:00+00:00", "git_revision": "abc", "hardware": "Test CPU", "device": "cpu",
           "torch_version": "2", "triton_version": "3"}
    rows = []
    for mode, metrics in mode_values.items():
        for metric, value in metrics.items():
            rows.append({**env, "run_id": run_id, "benchmark": "throughput", "preset": preset, "mode": mode,
                         "config": "", "metric": metric, "value": value, "unit": ""})
    return rows


def test_report_draws_from_the_file_only(tmp_path):
    path = tmp_path / "r.csv"
    old = _rows("r1", "sd15", {"fastdag": {"epoch_seconds": 9.0}})
    new = _rows("r2", "sd15", {
        "fastdag": {"epoch_seconds": 2.0, "rollout_traj_per_s": 4, "phase_s.rollout.unet": 1.0,
                    "phase_s.rollout.host": 0.1, "phase_s.update.backward": 0.9, "rollout_over_unet_only": 0.9},
        "official": {"epoch_seconds": 6.0, "official_over_fastdag_epoch": 3.0, "same_first_epoch_rewards": 1,
                     "phase_s.update.decode": 3.0, "phase_s.rollout.unet": 1.0},
        "eager": {"denoise_traj_per_s.b1": 1.0, "denoise_traj_per_s.b8": 4.0},
        "cuda_graphs": {"denoise_traj_per_s.b1": 2.0, "denoise_traj_per_s.b8": 4.4},
        "device": {"matmul_tflops": 700, "nvml_power_w": 500},
    })
    harness.append_rows(path, old + new, throughput.THROUGHPUT_FIELDS)
    text = report.summary(path)  # latest run only
    assert "| fastdag | 2.000 |" in text and "9.000" not in text
    assert "**3.00×**" in text and "| 1 | 1 | 2 | 2.00× |" in text and "power_w 500" in text
    assert "90.0%" in text and "| backward |" in text
    png = report.chart(path, tmp_path / "r.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "9.000" in report.summary(path, run_id="r1")
    with pytest.raises(ValueError):
        report.summary(path, run_id="nope")
    report.main(["--results", str(path), "--chart", str(tmp_path / "m.png"), "--summary", str(tmp_path / "m.md")])
    assert (tmp_path / "m.md").read_text().startswith("# fastdag throughput")


def test_benchmarks_entry_point_dispatches(capsys):
    from fastdag.bench.__main__ import main

    assert main(["--help"]) == 0 and "fastdag bench tiny" in capsys.readouterr().out
    assert main(["nope"]) == 2


def test_matmul_rate_is_measured():
    assert harness.measure_matmul_tflops("cpu", torch.float32, n=64, warmup=1, repeat=2) > 0


def test_sd15_configs_have_sd15_parameter_counts():
    from fastdag.families.presets import PRESETS, sd15_parameter_counts

    counts = sd15_parameter_counts()  # meta device: no memory, no init
    assert counts["unet"] == pytest.approx(859.52e6, rel=1e-4)
    assert counts["vae"] == pytest.approx(83.65e6, rel=1e-3)
    assert counts["text_encoder"] == pytest.approx(123.06e6, rel=1e-3)
    assert "sd15-random" in PRESETS and "sd15" in throughput.PRESETS


def test_sd15_architecture_runs_at_reduced_width():
    from fastdag.families import family_for
    from fastdag.families.presets import sd15_random_pipeline

    pipe = sd15_random_pipeline(width_divisor=8, image_size=64)
    assert pipe.unet.config.down_block_types[0] == "CrossAttnDownBlock2D" and pipe.unet.config.layers_per_block == 2
    assert pipe.text_encoder.config.num_hidden_layers == 12 and pipe.tokenizer.model_max_length == 77
    model = family_for(pipe, torch.device("cpu"), torch.float32)
    cond = model.encode_prompts(["a red circle", "a cat"])
    assert cond.embeds.shape == (2, 77, 96)
    x, t = torch.randn(2, *model.latent_shape), torch.tensor([999, 500])
    eps, eps_c = model.predict(x, t, cond, model.encode_prompts([""]), 5.0)
    assert eps.shape == (2, 4, 8, 8) and torch.isfinite(eps).all()
    img = model.decode(x)
    assert img.shape == (2, 3, 64, 64) and 0 <= img.min() and img.max() <= 1


def test_first_epoch_rewards_are_compared_like_with_like():
    """Triton-sampled and reference-sampled epochs differ in the last bits: no 'same rewards' verdict across them."""
    from types import SimpleNamespace

    def trainer(backend, graphs=False):
        cfg = SimpleNamespace(kernels=SimpleNamespace(backend=backend), sample=SimpleNamespace(cuda_graphs=graphs))
        return SimpleNamespace(cfg=cfg, device=torch.device("cpu"))

    assert throughput.sampled_alike(trainer("auto"), trainer("reference"))  # auto is the reference on a CPU
    assert not throughput.sampled_alike(trainer("reference"), trainer("reference", graphs=True))
    from fastdag.kernels._compat import HAS_TRITON, INTERPRETED

    if HAS_TRITON and INTERPRETED:  # backend=triton runs here (in the interpreter): unlike the reference
        assert not throughput.sampled_alike(trainer("triton"), trainer("reference"))
