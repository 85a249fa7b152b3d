"""The config tree: defaults, YAML, dotted overrides, validation, and the CLI's one-line errors."""
import subprocess
import sys
from pathlib import Path

import pytest

from fastdag.config import Config, ConfigError, config_help, load_config, save_config

REPO = Path(__file__).resolve().parents[1]


def test_defaults_follow_the_paper():
    cfg = Config()
    assert (cfg.sample.num_steps, cfg.sample.eta, cfg.sample.guidance_scale) == (50, 1.0, 5.0)
    assert (cfg.dag.beta, cfg.dag.ratio_clip, cfg.dag.prox_coef, cfg.dag.reduce) == (100.0, 1e-4, 1.0, "mean")
    # the LoRA targets default to the family's: the official config's for the SD UNet
    from fastdag.families.sd import SDFamily

    assert cfg.lora.rank == 4 and cfg.lora.target_modules is None
    assert SDFamily.lora_targets == ["to_q", "to_k", "to_v", "to_out.0"]
    assert cfg.dag.kl_coefficient == cfg.dag.beta


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\n  seed: 3\ndag:\n  flow:\n    layers_per_block: 2\n")
    cfg = load_config(path, ["train.epochs=2", "dag.algorithm=kl", "lora.target_modules=[to_q]", "reward.kwargs.quality=80"])
    assert cfg.train.epochs == 2 and cfg.train.seed == 3 and cfg.dag.flow.layers_per_block == 2
    assert cfg.dag.algorithm == "kl" and cfg.lora.target_modules == ["to_q"]
    assert cfg.reward.kwargs == {"quality": 80}
    assert isinstance(load_config(None, ["train.learning_rate=1"]).train.learning_rate, float)


def test_overrides_into_a_mapping_set_one_key(tmp_path):
    # Each `reward.kwargs.KEY=...` sets its key: a second one used to replace the mapping, silently dropping the
    # first (a run with reward.kwargs.stated=sum reward.kwargs.taste_weight=0.5 ran without `stated`).
    path = tmp_path / "c.yaml"
    path.write_text("reward:\n  name: shapes_aesthetic\n  kwargs:\n    taste_weight: 1.0\n    stated: sum\n")
    cfg = load_config(path, ["reward.kwargs.stated=mean", "reward.kwargs.realism_weight=2"])
    assert cfg.reward.kwargs == {"taste_weight": 1.0, "stated": "mean", "realism_weight": 2}
    assert load_config(path, ["reward.kwargs.size=null"]).reward.kwargs["size"] is None
    # A whole mapping replaces the file's; a section given as a mapping still merges into the file's section.
    assert load_config(path, ["reward.kwargs={a: 1}"]).reward.kwargs == {"a": 1}
    path.write_text("train:\n  epochs: 7\n  seed: 3\n")
    cfg = load_config(path, ["train={epochs: 2}"])
    assert (cfg.train.epochs, cfg.train.seed) == (2, 3)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.epochs=3", "dag.beta=2.5"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.epoch=2"], "train.epoch: unknown key; valid keys here: epochs"),
        (["trian.epochs=2"], "trian: unknown key"),
        (["train.epochs=two"], "train.epochs: expected int, got 'two'"),
        (["train.epochs=1.5"], "train.epochs: expected int"),
        (["dag.algorithm=tb"], "dag.algorithm: must be one of db | kl | ddpo"),
        (["train.timestep_fraction=0"], "train.timestep_fraction: must be in (0, 1]"),
        (["train.batch_size=3"], "train.batch_size: must divide"),
        (["dag.flow.block_out_channels=[30]"], "dag.flow.block_out_channels"),
        (["logging.progress=maybe"], "logging.progress: expected bool"),
        (["train.epochs"], "overrides look like key=value"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sample:\n  steps: 3\n")
    with pytest.raises(ConfigError, match="sample.steps: unknown key; valid keys here: num_steps"):
        load_config(path)


def test_help_rows_cover_every_section():
    keys = [row[0] for row in config_help()]
    for section in ("model", "lora", "sample", "train", "dag", "reward", "prompts", "engine", "checkpoint", "logging"):
        assert any(k.startswith(section + ".") for k in keys), section
    assert "dag.flow.block_out_channels" in keys
    assert all(row[3] for row in config_help()), "every field has a help text"


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    load_config(REPO / "configs" / name)


def run_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "fastdag.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_cli_help_lists_fields():
    res = run_cli("train", "--help")
    assert res.returncode == 0
    assert "dag.xhat_rewards" in res.stdout and "train.timestep_fraction" in res.stdout


@pytest.mark.parametrize(
    "args, needle",
    [
        (["train.epochs=two"], "train.epochs: expected int, got 'two'"),
        (["nope.x=1"], "nope: unknown key"),
        (["model.pretrained=/no/such/model"], "model.pretrained: '/no/such/model'"),
        (["--config", "missing.yaml"], "--config: no such file"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(args, needle, tmp_path):
    res = run_cli("train", *args, f"logging.output_dir={tmp_path}")
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("fastdag: error:") and needle in lines[-1], res.stderr
    assert "Traceback" not in res.stderr


def test_cli_empty_prompt_file_exits_2(tmp_path):
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n  \n")
    res = run_cli("train", f"prompts.source={empty}", f"logging.output_dir={tmp_path}")
    assert res.returncode == 2
    assert "holds no prompts" in res.stderr.strip().splitlines()[-1] and "Traceback" not in res.stderr
