"""The paper's four SD 1.5 configs and the SD3.5 / FLUX / SDXL ones: each validates with the settings it states,
and one tiny epoch runs with its reward on its family's tiny random weights (base and reward models swapped by
overrides)."""
import json
from pathlib import Path

import pytest

import reward_testing as rt
from fastdag.config import load_config
from fastdag.prompts import load_prompts
from fastdag.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
TASKS = {  # config -> (reward, prompt set)
    "sd15_aesthetic.yaml": ("laion_aesthetic", "simple_animals"),
    "sd15_imagereward.yaml": ("imagereward", "drawbench"),
    "sd15_hpsv2.yaml": ("hpsv2", "hpdv2"),
    "sd15_compress.yaml": ("jpeg_compressibility", "imagenet_classes"),
}
TINY = [
    "model.pretrained=tiny-random", "model.dtype=auto", "train.epochs=1", "sample.num_steps=3", "sample.batch_size=4",
    "sample.num_batches_per_epoch=1", "train.batch_size=4", "train.gradient_accumulation_steps=1",
    "dag.flow.block_out_channels=[32,64]", "dag.flow.norm_num_groups=8", "logging.progress=false",
    "logging.grid_size=0", "engine.backend=torch", "eval.prompts=null", "reward.batch_size=4",
]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_paper_config_validates_with_the_paper_settings(name):
    cfg = load_config(REPO / "configs" / name)
    reward, prompts = TASKS[name]
    assert (cfg.reward.name, cfg.prompts.source) == (reward, prompts)
    assert cfg.model.pretrained == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert (cfg.lora.rank, cfg.lora.target_modules) == (4, ["to_q", "to_k", "to_v", "to_out.0"])
    assert (cfg.sample.num_steps, cfg.sample.eta, cfg.sample.guidance_scale) == (50, 1.0, 5.0)
    assert cfg.trajectories_per_epoch == 512 and cfg.train.epochs == 100
    assert (cfg.train.learning_rate, cfg.train.flow_learning_rate, cfg.train.max_grad_norm) == (3e-4, 3e-4, 1.0)
    assert (cfg.dag.beta, cfg.dag.beta_schedule, cfg.dag.anneal_fraction, cfg.dag.prox_coef) == (100.0, "linear", 0.5, 1.0)
    assert cfg.dag.ratio_clip == 1e-4
    assert load_prompts(cfg.prompts)  # the named set ships with the package
    if cfg.eval.prompts:
        assert not set(load_prompts(cfg.prompts)) & set(load_prompts(type(cfg.prompts)(source=cfg.eval.prompts)))


@pytest.mark.parametrize("name", sorted(TASKS))
def test_one_tiny_epoch_with_each_reward(name, tmp_path, monkeypatch):
    reward, _ = TASKS[name]
    overrides = [*TINY, f"logging.output_dir={tmp_path}", "logging.run_name=run"]
    if reward in rt.TINY:
        kwargs, _, _ = rt.TINY[reward](tmp_path)
        overrides.append(f"reward.kwargs={json.dumps(kwargs)}")
    cfg = load_config(REPO / "configs" / name, overrides)
    rows = Trainer(cfg).fit()
    assert len(rows) == 1 and all(k in rows[0] for k in ("reward_mean", "reward_std", "loss"))
    assert rows[0]["reward_std"] > 0  # the reward saw different images
    assert (tmp_path / "run/checkpoints/epoch-0001/pytorch_lora_weights.safetensors").is_file()


# The new families' configs: (reward, prompt set, the family's tiny preset, the settings they state)
FAMILY_TASKS = {
    "sd35m_pickscore.yaml": ("pickscore", "hpdv2", "tiny-random-sd3"),
    "sd35m_compress.yaml": ("jpeg_compressibility", "imagenet_classes", "tiny-random-sd3"),
    "flux_pickscore.yaml": ("pickscore", "hpdv2", "tiny-random-flux"),
    "sdxl_aesthetic.yaml": ("laion_aesthetic", "simple_animals", "tiny-random-sdxl"),
}


@pytest.mark.parametrize("name", sorted(FAMILY_TASKS))
def test_family_config_states_flow_grpos_settings(name):
    cfg = load_config(REPO / "configs" / name)
    reward, prompts, _ = FAMILY_TASKS[name]
    assert (cfg.reward.name, cfg.prompts.source) == (reward, prompts)
    if name.startswith(("sd35m", "flux")):  # Flow-GRPO: 512 px, 10 SDE steps at a = 0.7, LoRA r 32 / alpha 64
        assert (cfg.model.resolution, cfg.sample.num_steps, cfg.sample.noise_level) == (512, 10, 0.7)
        assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules) == (32, 64, None)
        assert cfg.sample.guidance_scale == (3.5 if name.startswith("flux") else 4.5)
    if cfg.eval.prompts:
        assert not set(load_prompts(cfg.prompts)) & set(load_prompts(type(cfg.prompts)(source=cfg.eval.prompts)))


@pytest.mark.parametrize("name", sorted(FAMILY_TASKS))
def test_one_tiny_epoch_of_each_family_config(name, tmp_path):
    reward, _, preset = FAMILY_TASKS[name]
    overrides = [*TINY, f"model.pretrained={preset}", "model.resolution=null", "eval.prompts=null",
                 f"logging.output_dir={tmp_path}", "logging.run_name=run", "dag.flow.block_out_channels=[32,64]"]
    if reward in rt.TINY:
        kwargs, _, _ = rt.TINY[reward](tmp_path)
        overrides.append(f"reward.kwargs={json.dumps(kwargs)}")
    rows = Trainer(load_config(REPO / "configs" / name, overrides)).fit()
    assert len(rows) == 1 and rows[0]["reward_std"] > 0
    assert (tmp_path / "run/checkpoints/epoch-0001/pytorch_lora_weights.safetensors").is_file()
