"""The shapes-tiny pretraining recipe (on a schedule of seconds) and the shipped pretrained pipeline."""
from __future__ import annotations

import functools
import json

import pytest
import torch

from fastdag.toy import pretrain as recipe_module
from fastdag.toy.pretrain import METRICS_NAME, SHIPPED_DIR, Recipe, evaluate_pipeline, pretrain, world_tokenizer
from fastdag.toy.world import ATTRIBUTE_DROPOUT, parse_prompt, shapes_prompts, world_vocabulary

# A few steps of each phase and an evaluation of 2 prompts × 1 sample × 2 DDIM steps: seconds on 2 CPU threads.
TINY = dict(
    vae_steps=2,
    unet_steps=2,
    batch_size=2,
    vae_batch_size=2,
    progress=False,
    scaling_images=8,
    eval_prompts=2,
    eval_samples_per_prompt=1,
    eval_steps=2,
)


def _load(path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, prompt: str, steps: int = 3) -> torch.Tensor:
    out = pipe(prompt, num_inference_steps=steps, guidance_scale=5.0, generator=torch.Generator().manual_seed(0),
               output_type="pt")
    return out.images


def test_world_tokenizer_spells_each_word_as_one_token() -> None:
    tokenizer = world_tokenizer()
    for word in world_vocabulary():
        assert len(tokenizer.tokenize(word)) == 1, word
    longest = max(len(tokenizer(p).input_ids) for p in shapes_prompts("train") + shapes_prompts("heldout"))
    assert longest <= tokenizer.model_max_length


def test_short_pretrain_saves_a_loadable_pipeline(tmp_path) -> None:
    metrics = pretrain(tmp_path, seed=3, **TINY)
    saved = json.loads((tmp_path / METRICS_NAME).read_text())
    assert saved["recipe"]["unet_steps"] == 2 and saved["seed"] == 3
    assert set(saved["cpu_seconds"]) == set(saved["seconds"]) and saved["cpu_seconds"]["total"] > 0
    assert set(saved["heldout_evaluation"]) == {"eta0", "eta1"}
    assert 0.0 <= saved["heldout_evaluation"]["eta0"]["accuracy"]["colour"] <= 1.0
    assert len(saved["losses"]["unet"]["rows"]) == 2 and saved == json.loads(json.dumps(metrics))
    assert not list(tmp_path.rglob("*.bin"))  # safetensors only

    pipe = _load(tmp_path)
    assert pipe.vae.config.scaling_factor == pytest.approx(metrics["latents"]["scaling_factor"])
    images = _generate(pipe, shapes_prompts("heldout")[0], steps=2)
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def test_denoiser_trains_on_partial_captions(tmp_path, monkeypatch) -> None:
    seen: list[str] = []
    real = recipe_module.sample_batch

    def recording(*args, **kwargs):
        batch = real(*args, **kwargs)
        if kwargs.get("attribute_dropout"):
            seen.extend(batch.captions)
        return batch

    monkeypatch.setattr(recipe_module, "sample_batch", recording)
    pretrain(tmp_path, seed=0, **{**TINY, "unet_steps": 8, "batch_size": 8})
    assert Recipe().attribute_dropout == ATTRIBUTE_DROPOUT > 0
    assert len(seen) == 64 and not all(parse_prompt(c).full for c in seen)


def test_unknown_recipe_setting_is_an_error(tmp_path) -> None:
    with pytest.raises(TypeError, match="unet_lrr"):
        pretrain(tmp_path, unet_lrr=1.0)


def test_main_runs_the_recipe(tmp_path, monkeypatch, capsys) -> None:
    tiny_eval = {k: TINY[k] for k in ("vae_batch_size", "scaling_images", "eval_prompts", "eval_samples_per_prompt", "eval_steps")}
    monkeypatch.setattr(recipe_module, "pretrain", functools.partial(pretrain, **tiny_eval))
    argv = ["--out", str(tmp_path), "--seed", "1", "--vae-steps", "1", "--unet-steps", "2", "--batch-size", "2",
            "--attribute-dropout", "0.5", "--threads", str(torch.get_num_threads()), "--no-progress"]
    assert recipe_module.main(argv) == 0
    saved = json.loads((tmp_path / METRICS_NAME).read_text())
    assert saved["recipe"]["vae_steps"] == 1 and saved["recipe"]["batch_size"] == 2 and saved["seed"] == 1
    assert saved["recipe"]["attribute_dropout"] == 0.5
    out = capsys.readouterr().out
    # DeepSpeed may log a line to stdout when this test is the first to import it; the summary is the JSON after.
    assert "heldout_accuracy" in json.loads(out[out.index("{\n"):])
    assert (tmp_path / "model_index.json").is_file()


# The pretrained shapes-tiny model is not shipped yet (issue 3 is open); these check it once it is.
needs_shipped_model = pytest.mark.skipif(
    not (SHIPPED_DIR / "model_index.json").is_file(), reason="shapes-tiny is not shipped yet (issue 3)"
)


@needs_shipped_model
def test_shipped_pipeline_loads_offline_and_generates(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    weights = sum(f.stat().st_size for f in SHIPPED_DIR.rglob("*.safetensors"))
    assert 0 < weights < 15e6
    pipe = _load(SHIPPED_DIR)
    images = _generate(pipe, shapes_prompts("heldout")[0])
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
    assert images.min() >= 0.0 and images.max() <= 1.0


@needs_shipped_model
def test_shipped_recipe_metrics_meet_the_bar() -> None:
    """The base model is good enough to recognise (issue 3) and leaves the alignment job headroom."""
    metrics = json.loads((SHIPPED_DIR / METRICS_NAME).read_text())
    accuracy = metrics["heldout_evaluation"]["eta0"]["accuracy"]
    assert accuracy["colour"] >= 0.6 and accuracy["shape"] >= 0.5
    assert accuracy["all"] <= 0.9
    # Wall time on a quiet box; beside other jobs the 1-thread recipe's CPU time is the cost on an idle core
    # (older metrics lack cpu_seconds; the one shipped in issue 12 records it as measured from outside).
    cpu = metrics.get("cpu_seconds", metrics.get("cpu_seconds_observed", {})).get("total", float("inf"))
    assert min(metrics["seconds"]["total"], cpu) < 45 * 60


@pytest.mark.slow
@needs_shipped_model
def test_shipped_pipeline_heldout_accuracy() -> None:
    """Re-measures the shipped model's held-out accuracy (256 samples, 20 DDIM steps, CFG 5, eta 0)."""
    result = evaluate_pipeline(_load(SHIPPED_DIR), shapes_prompts("heldout"))
    assert result["images"].shape == (256, 3, 32, 32)
    assert result["accuracy"]["colour"] >= 0.6 and result["accuracy"]["shape"] >= 0.5
