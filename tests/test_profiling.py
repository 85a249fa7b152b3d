"""The phase timer, the profiler command, NVML absence, and the speed levers' guards and equivalences (CPU)."""
import logging
import sys
import types

import torch

from fastdag.config import load_config
from fastdag.profiling import NULL_TIMER, PhaseTimer, format_table, nvml_telemetry, plot_breakdown
from fastdag.trainer import Trainer

TINY = [
    "train.epochs=1", "sample.num_steps=4", "sample.batch_size=4", "sample.num_batches_per_epoch=1", "train.batch_size=4",
    "train.gradient_accumulation_steps=1", "dag.beta=10", "dag.beta_schedule=constant",
    "dag.flow.block_out_channels=[32,64]", "dag.flow.norm_num_groups=8", "logging.progress=false",
    "engine.backend=torch", "logging.grid_size=0", "checkpoint.save_final=false",
]


def tiny_trainer(tmp_path, *overrides):
    return Trainer(load_config(None, [*TINY, f"logging.output_dir={tmp_path}", "logging.run_name=run", *overrides]))


def test_disabled_timer_is_a_shared_noop_and_never_synchronises(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("synchronize called with profiling off")

    monkeypatch.setattr(torch.cuda, "synchronize", boom)
    timer = PhaseTimer(enabled=False, device="cuda")  # even on a CUDA device: no clock, no sync
    assert timer.phase("unet") is timer.phase("decode") is timer.stage("rollout")
    with timer.stage("rollout"), timer.phase("unet"):
        pass
    assert timer.seconds() == {} and not NULL_TIMER.enabled


def test_enabled_timer_is_exclusive_and_reports_host_overhead(monkeypatch):
    clock = iter(range(100))
    monkeypatch.setattr("fastdag.profiling.time.perf_counter", lambda: float(next(clock)))
    timer = PhaseTimer(enabled=True, device="cpu")
    with timer.stage("rollout"):  # t=0
        with timer.phase("unet"):  # 1 .. 2 (paused), 3 .. 4
            with timer.phase("decode"):  # 2 .. 3
                pass
        with timer.phase("reward"):  # 5 .. 6
            pass
    # stage closes at 7: wall 7, phases unet 2 + decode 1 + reward 1, host 3
    out = timer.seconds()["rollout"]
    assert (out["unet"], out["decode"], out["reward"], out["host"]) == (2.0, 1.0, 1.0, 3.0)
    table = format_table({"rollout": out, "update": {"backward": 2.0, "host": 0.0}}, title="t")
    assert "| unet | 2.000 | 28.6" in table and "**total**" in table and "update s" in table


def test_plot_breakdown_writes_a_png(tmp_path):
    path = plot_breakdown({"a": {"rollout": {"unet": 1.0, "host": 0.1}, "update": {"backward": 2.0}}},
                          tmp_path / "c.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_nvml_telemetry_degrades_without_gpu_or_package(monkeypatch):
    assert nvml_telemetry("cpu") == {}
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed
    assert nvml_telemetry("cuda") == {}

    class NVMLError(Exception):
        pass

    def init():
        raise NVMLError("Driver Not Loaded")

    fake = types.SimpleNamespace(NVMLError=NVMLError, nvmlInit=init, nvmlShutdown=lambda: None)
    monkeypatch.setitem(sys.modules, "pynvml", fake)  # installed, no GPU: nvmlInit raises
    assert nvml_telemetry("cuda") == {}


def test_profile_command_prints_table_and_saves_chart(tmp_path, capsys):
    from fastdag.cli import main

    chart, table = tmp_path / "p.png", tmp_path / "p.md"
    code = main(["profile", "--config", "configs/tiny_random_compress.yaml", "--chart", str(chart), "--table",
                 str(table), "sample.num_steps=3", "sample.batch_size=4", "engine.backend=torch"])
    assert code == 0
    out = capsys.readouterr().out
    for phase in ("unet", "step", "decode", "reward", "flow", "backward", "optimizer", "host"):
        assert f"| {phase} |" in out, phase
    assert "rollout s" in out and "update s" in out
    assert chart.read_bytes()[:4] == b"\x89PNG" and "| unet |" in table.read_text()


def test_profile_command_rejects_a_bad_key(capsys):
    from fastdag.cli import main

    assert main(["profile", "train.epoch=1"]) == 2
    assert "unknown key" in capsys.readouterr().err


def test_cuda_graphs_on_cpu_log_once_and_run_eager(tmp_path, monkeypatch, caplog):
    from fastdag import rollout
    from fastdag.families import base as models

    def no_graphs(*a, **k):
        raise AssertionError("a CUDA graph was constructed on a CPU")

    monkeypatch.setattr(rollout, "GraphedStep", no_graphs)
    monkeypatch.setattr(models, "_LOGGED", set())
    rewards = {}
    for graphs in (False, True):
        trainer = tiny_trainer(tmp_path, f"sample.cuda_graphs={str(graphs).lower()}", "sample.num_batches_per_epoch=2")
        with caplog.at_level(logging.WARNING, logger="fastdag.families.base"):
            rewards[graphs] = trainer.sample_epoch().rewards
    assert sum("CUDA graphs need a CUDA device" in r.message for r in caplog.records) == 1
    torch.testing.assert_close(rewards[True], rewards[False], rtol=0, atol=0)


def test_xformers_falls_back_to_sdpa_once(tmp_path, monkeypatch, caplog):
    from fastdag.families import base as models

    class FakeOps:
        @staticmethod
        def memory_efficient_attention(q, k, v):
            raise NotImplementedError("No operator found for `memory_efficient_attention_forward`")

    fake = types.ModuleType("xformers")
    fake.ops = FakeOps
    monkeypatch.setitem(sys.modules, "xformers", fake)
    monkeypatch.setitem(sys.modules, "xformers.ops", FakeOps)
    monkeypatch.setattr(models, "_LOGGED", set())
    assert models.xformers_works(torch.device("cpu"), torch.float32)[0] is False
    with caplog.at_level(logging.WARNING, logger="fastdag.families.base"):
        trainer = tiny_trainer(tmp_path, "model.attention=xformers")
        assert trainer.model.set_attention("xformers") == "sdpa"
    assert trainer.model.attention == "sdpa"
    assert sum("using PyTorch SDPA" in r.message for r in caplog.records) == 1
    trainer.train_epoch(trainer.sample_epoch(), beta=10.0)  # and it trains


def test_channels_last_gives_the_same_rollout(tmp_path):
    rewards = {}
    for cl in ("false", "true"):
        rewards[cl] = tiny_trainer(tmp_path, f"model.channels_last={cl}", "reward.name=brightness").sample_epoch().rewards
    torch.testing.assert_close(rewards["true"], rewards["false"], rtol=1e-5, atol=1e-6)


def test_compile_option_compiles_the_unet_in_place(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: calls.append(type(self).__name__))
    trainer = tiny_trainer(tmp_path, "model.compile=true")
    assert calls == ["UNet2DConditionModel"] and trainer.model.unet.__class__.__name__ == "UNet2DConditionModel"


def test_overlapped_scorer_runs_inline_on_cpu():
    from fastdag.rollout import OverlappedScorer

    scorer = OverlappedScorer(torch.device("cpu"), enabled=True)
    assert not scorer.enabled
    assert scorer.submit(lambda: 42).result() == 42
    scorer.close()
