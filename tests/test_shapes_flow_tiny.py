"""shapes-flow-tiny: the flow-matching recipe on a schedule of seconds, and the shipped model through plain diffusers
(StableDiffusion3Pipeline) and the trainer's flow main job."""
import json
from pathlib import Path

import pytest
import torch

from fastdag.config import load_config
from fastdag.toy.pretrain_flow import FLOW_SHIPPED_DIR, FlowRecipe, build_flow_pipeline, pretrain_flow
from fastdag.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


def test_the_recipe_builds_sd3_components_and_encodes_as_the_pipeline():
    pipe = build_flow_pipeline(FlowRecipe(), seed=1)
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    assert pipe.transformer.config.joint_attention_dim == pipe.text_encoder_3.config.d_model == 2 * 64
    # the CLIPs start from shapes-tiny's text encoder: same token embedding
    from transformers import CLIPTextModel

    source = CLIPTextModel.from_pretrained(str(FLOW_SHIPPED_DIR.parent / "shapes-tiny/text_encoder"))
    assert torch.equal(pipe.text_encoder.text_model.embeddings.token_embedding.weight,
                       source.embeddings.token_embedding.weight)
    embeds, _, pooled, _ = pipe.encode_prompt(["a red circle"], None, None, do_classifier_free_guidance=False,
                                              max_sequence_length=pipe.tokenizer.model_max_length)
    assert embeds.shape == (1, 2 * pipe.tokenizer.model_max_length, 128) and pooled.shape == (1, 128)


def test_a_short_pretrain_saves_a_pipeline_plain_diffusers_loads(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    metrics = pretrain_flow(tmp_path, seed=2, steps=3, batch_size=4, progress=False, judge_figures=False,
                            scaling_images=16)
    assert json.loads((tmp_path / "recipe_metrics.json").read_text())["recipe"]["steps"] == 3
    assert metrics["latents"]["std"] > 0 and len(metrics["losses"]["flow"]["rows"]) == 3
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tmp_path))
    vae = pipe.vae.config
    assert vae.shift_factor == pytest.approx(metrics["latents"]["mean"]) and vae.scaling_factor > 0
    out = pipe("a red circle", num_inference_steps=2, guidance_scale=5.0, height=32, width=32, output_type="pt",
               max_sequence_length=pipe.tokenizer.model_max_length).images
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


def test_shapes_flow_tiny_loads_offline_as_the_sd3_family(monkeypatch):
    from diffusers import StableDiffusion3Pipeline

    from fastdag.assets import PIPELINES
    from fastdag.families import family_for

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = StableDiffusion3Pipeline.from_pretrained(PIPELINES["shapes-flow-tiny"](), local_files_only=True)
    model = family_for(pipe, torch.device("cpu"), torch.float32)
    assert model.name == "sd3" and model.latent_shape == (4, 8, 8)
    size = sum(f.stat().st_size for f in FLOW_SHIPPED_DIR.rglob("*") if f.is_file())
    assert size <= 10 * 2**20, f"{size / 2**20:.1f} MiB"
    figures = json.loads((FLOW_SHIPPED_DIR / "base_figures.json").read_text())
    assert figures["bars"]["colour"]["met"]


def test_the_flow_main_job_runs_three_epochs(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config(REPO / "configs/shapes_aesthetic_flow.yaml", [
        "train.epochs=3", "sample.num_steps=4", "sample.batch_size=4", "sample.num_batches_per_epoch=1",
        "train.batch_size=4", "train.gradient_accumulation_steps=1", "train.timesteps_per_micro_step=2",
        "train.timestep_fraction=0.5", "eval.samples_per_prompt=1", "eval.num_steps=2", "engine.backend=torch",
        "logging.progress=false", f"logging.output_dir={tmp_path}", "logging.run_name=flow",
    ])
    trainer = Trainer(cfg)
    rows = trainer.fit()
    assert trainer.model.name == "sd3" and [r["epoch"] for r in rows] == [1, 2, 3]
    assert all(r["reward_max"] <= 0 for r in rows)
    assert 0 <= trainer.evaluations["after"].scores["judge_taste"] <= 1
    assert (tmp_path / "flow/report.md").is_file()
