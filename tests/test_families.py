"""Every model family on its tiny offline preset: the family follows from the pipeline, noise-free rollouts equal the
pipeline's own sampling loop, every objective trains in fp32 and bf16, the saved LoRA loads with the family's own
pipeline and changes its images, and a SIGKILLed run resumes bit-identical."""
import json

import pytest
import torch

from fastdag.config import ConfigError, LoraConfig, ModelConfig, SampleConfig
from fastdag.families import FAMILIES, build_model, family_for, load_pipeline
from fastdag.families.presets import PRESETS
from fastdag.rollout import rollout_batch
from fastdag.trainer import Trainer
from test_resume import _kill, _resume_to_the_end, _train_cli, _wait_for, cfg as resume_cfg
from test_trainer import tiny_cfg

FAMILY_PRESETS = {"sd": "tiny-random", "sdxl": "tiny-random-sdxl", "sd3": "tiny-random-sd3",
                  "flux": "tiny-random-flux", "ddpm": "tiny-random-ddpm"}
NEW = ("sdxl", "sd3", "flux")
PROMPTS = ["a red cat", "a dog on the beach"]


def test_the_family_follows_from_the_pipeline(tmp_path):
    assert {cls.name for cls in FAMILIES.values()} == set(FAMILY_PRESETS)
    for family, preset in FAMILY_PRESETS.items():
        model = family_for(PRESETS[preset](), torch.device("cpu"), torch.float32)
        assert model.name == family
    # a saved directory: the family is read from model_index.json, and an unknown pipeline is refused before loading
    PRESETS["tiny-random-sd3"]().save_pretrained(tmp_path / "sd3")
    assert family_for(load_pipeline(ModelConfig(pretrained=str(tmp_path / "sd3"))), torch.device("cpu"),
                      torch.float32).name == "sd3"
    index = json.loads((tmp_path / "sd3/model_index.json").read_text())
    (tmp_path / "sd3/model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyPipeline"}))
    with pytest.raises(ConfigError, match="is a KandinskyPipeline .*fastdag aligns StableDiffusionPipeline"):
        load_pipeline(ModelConfig(pretrained=str(tmp_path / "sd3")))


def _pipeline_latents(model, prompts, x_T, steps: int, guidance: float) -> torch.Tensor:
    """The family's own diffusers pipeline, sampling from x_T with its scheduler (DDIM with η = 0 for the UNets)."""
    side = model.latent_shape[1] * model.vae_scale_factor
    kwargs = dict(num_inference_steps=steps, guidance_scale=guidance, height=side, width=side, output_type="latent")
    if model.name == "flux":
        out = model.pipeline(prompts, latents=model.pack(x_T), max_sequence_length=model.max_sequence_length, **kwargs)
        return model.unpack(out.images)
    if model.name == "sd3":
        return model.pipeline(prompts, latents=x_T, max_sequence_length=model.max_sequence_length, **kwargs).images
    return model.pipeline(prompts, latents=x_T, eta=0.0, **kwargs).images


@pytest.mark.parametrize("family", NEW)
def test_a_noise_free_rollout_is_the_pipelines_own_sampling_loop(family):
    model, _ = build_model(ModelConfig(pretrained=FAMILY_PRESETS[family], device="cpu"), LoraConfig())
    sampler = model.make_sampler(4, SampleConfig(eta=0.0, noise_level=0.0), backend="reference")
    guidance = 3.5 if family == "flux" else 4.5
    rollout = rollout_batch(model, sampler, PROMPTS, guidance_scale=guidance, uncond=model.encode_negative(""),
                            generator=torch.Generator().manual_seed(0), keep_xhat=True)
    with torch.no_grad():
        expected = _pipeline_latents(model, PROMPTS, rollout.latents[:, 0], 4, guidance)
    torch.testing.assert_close(rollout.latents[:, -1], expected.float(), rtol=1e-5, atol=1e-5)
    assert rollout.latents[:, -1].abs().max() > 0.1  # a real sample, not a trivially equal zero
    assert (rollout.log_pf == 0).all()  # deterministic steps have no density


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("algorithm", ["db", "kl", "ddpo", "grpo"])
@pytest.mark.parametrize("family", NEW)
def test_every_objective_trains_on_every_family(tmp_path, family, algorithm, dtype):
    extra = ["sample.group_size=2"] if algorithm == "grpo" else []
    trainer = Trainer(tiny_cfg(tmp_path, f"model.pretrained={FAMILY_PRESETS[family]}", f"dag.algorithm={algorithm}",
                               f"model.dtype={dtype}", "reward.name=brightness", *extra))
    before = {k: v.clone() for k, v in trainer.model.lora_state_dict().items()}
    row = trainer.fit()[0]
    assert all(torch.isfinite(torch.tensor(float(v))) for k, v in row.items() if k != "epoch"), row
    assert row["logp_mismatch_max"] <= 1e-3  # the rollout's log p_F and the update's recomputed one agree
    after = trainer.model.lora_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "the LoRA did not move"
    if trainer.flow is not None:  # the flow network reads the family's latent channels and prompt embeddings
        assert trainer.flow.conv_in.in_channels == trainer.model.latent_shape[0]


@pytest.mark.parametrize("family", ["sd", *NEW])
def test_the_saved_lora_loads_in_the_familys_pipeline_and_changes_its_images(tmp_path, family):
    trainer = Trainer(tiny_cfg(tmp_path, f"model.pretrained={FAMILY_PRESETS[family]}", "dag.algorithm=ddpo",
                               "train.learning_rate=0.05", "reward.name=brightness"))
    trainer.fit()
    model = trainer.model
    model.save_lora(tmp_path / "lora")
    pipe = PRESETS[FAMILY_PRESETS[family]]()  # a fresh pipeline, as a diffusers user would load it
    reference = family_for(pipe, torch.device("cpu"), torch.float32)  # shares the pipeline's modules
    x_T = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        base = _pipeline_latents(reference, PROMPTS, x_T, 3, 4.5)
        pipe.load_lora_weights(tmp_path / "lora")
        tuned = _pipeline_latents(reference, PROMPTS, x_T, 3, 4.5)
        # our LoRA'd model, through the same pipeline loop
        ours = _pipeline_latents(model, PROMPTS, x_T, 3, 4.5)
    assert (tuned - base).abs().max() > 1e-3, "loading the LoRA did not change the images"
    torch.testing.assert_close(tuned, ours, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_sigkill_and_resume_is_bit_identical(tmp_path, family):
    extra = [f"model.pretrained={FAMILY_PRESETS[family]}", "train.epochs=3"]
    Trainer(resume_cfg(tmp_path / "ref", "ref", *extra)).fit()
    reference = tmp_path / "ref/ref"
    proc = _train_cli(tmp_path, *extra)
    _wait_for(tmp_path / "run/checkpoints/epoch-0001/checkpoint.json", proc)
    _kill(proc)
    last = sorted((tmp_path / "run/checkpoints").glob("epoch-*[0-9]"))[-1]
    _resume_to_the_end(tmp_path, reference, expect_from=last.name, extra=extra, epochs=3)


def test_prompt_embeddings_are_cached_and_text_encoders_offload(tmp_path):
    trainer = Trainer(tiny_cfg(tmp_path, "model.pretrained=tiny-random-sd3", "model.offload_text_encoders=true"))
    model = trainer.model
    assert all(p.device.type == "cpu" for m in model.text_encoders() for p in m.parameters())
    assert set(trainer.prompts.prompts) <= set(model._prompt_cache)
    calls = []
    model._encode = lambda prompts: calls.append(prompts)  # a cached prompt never reaches the text encoders again
    cond = model.encode_prompts(trainer.prompts.prompts[:3])
    assert calls == [] and cond.embeds.shape[0] == 3 and cond.pooled is not None
    trainer.fit()  # and it trains with the text encoders on the CPU


@pytest.mark.parametrize("family", NEW)
def test_evaluation_report_and_profile_per_family(tmp_path, family):
    from fastdag.profiling import profile_epoch

    trainer = Trainer(tiny_cfg(tmp_path, f"model.pretrained={FAMILY_PRESETS[family]}", "eval.prompts=tiny",
                               "eval.samples_per_prompt=1", "eval.num_steps=2", "eval.eta=0", "reward.name=brightness"))
    trainer.fit()
    assert set(trainer.evaluations) == {"before", "after"}
    assert (tmp_path / "run/report.md").is_file()
    result = profile_epoch(trainer)
    assert result["breakdown"]["rollout"]["unet"] > 0 and result["breakdown"]["update"]["backward"] > 0
