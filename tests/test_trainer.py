"""End-to-end training on the tiny presets: outputs, cache equivalence, LoRA export, model kinds, engines."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastdag.bench.throughput import CountingReward
from fastdag.config import load_config
from fastdag.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]

TINY = [
    "train.epochs=1", "sample.num_steps=4", "sample.batch_size=4", "sample.num_batches_per_epoch=1", "train.batch_size=4",
    "train.gradient_accumulation_steps=1", "dag.beta=10", "dag.beta_schedule=constant",
    "dag.flow.block_out_channels=[32,64]", "dag.flow.norm_num_groups=8", "logging.progress=false",
    "engine.backend=torch",
]


def tiny_cfg(tmp_path, *overrides):
    return load_config(None, [*TINY, f"logging.output_dir={tmp_path}", "logging.run_name=run", *overrides])


def without_launcher_env() -> dict[str, str]:
    """os.environ less the launcher variables that an in-process DeepSpeed run in this pytest worker set for itself
    (a child inheriting its MASTER_PORT would try to listen on the same port)."""
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    return {k: v for k, v in os.environ.items() if k not in launcher}


def test_cli_smoke_run_writes_every_output(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "fastdag.cli", "train", "--config", str(REPO / "configs/tiny_random_compress.yaml"),
         "train.epochs=2", "sample.num_steps=4", f"logging.output_dir={tmp_path}", "logging.run_name=smoke"],
        capture_output=True, text=True, timeout=600, env=without_launcher_env(),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "smoke"
    assert load_config(run / "config.yaml").train.epochs == 2
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("reward_mean", "reward_std", "reward_min", "reward_max", "beta", "loss", "db_loss", "prox",
                "rollout_seconds", "update_seconds"):
        assert all(key in r for r in rows), key
    assert (run / "samples/epoch-0001.png").is_file() and (run / "samples/epoch-0002.png").is_file()
    ckpt = run / "checkpoints/epoch-0002"
    assert (ckpt / "pytorch_lora_weights.safetensors").is_file() and (ckpt / "flow.safetensors").is_file()


def test_rollout_cache_and_recompute_give_the_same_first_minibatch_loss(tmp_path):
    # A smooth reward: the equality is about the math; JPEG size would flip on 1e-7 differences in a pixel.
    losses = {}
    for mode in ("rollout", "recompute"):
        trainer = Trainer(tiny_cfg(tmp_path, f"dag.xhat_rewards={mode}", "reward.name=brightness", "sample.num_steps=6",
                                   "sample.batch_size=6", "train.batch_size=3", "train.gradient_accumulation_steps=2"))
        trajs = trainer.sample_epoch()
        assert (trajs.xhat_rewards is not None) == (mode == "rollout")
        idx = torch.tensor([4, 0, 2])
        steps = torch.tensor([5, 0, 3])  # the last step (x_0's true reward) included
        loss, _ = trainer.objective(trainer.transition_terms(trajs, idx, steps, beta=10.0))
        losses[mode] = loss.item()
    assert losses["rollout"] == pytest.approx(losses["recompute"], rel=1e-5)


def test_saved_lora_loads_with_diffusers(tmp_path):
    from diffusers import StableDiffusionPipeline

    from fastdag.families.presets import tiny_text_to_image_pipeline

    trainer = Trainer(tiny_cfg(tmp_path, "train.learning_rate=1e-2"))
    trainer.fit()
    lora_dir = tmp_path / "run/checkpoints/epoch-0001"
    base_dir = tmp_path / "base"
    tiny_text_to_image_pipeline().save_pretrained(base_dir)
    pipe = StableDiffusionPipeline.from_pretrained(base_dir)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([500, 20]), torch.randn(2, 16, 32)
    with torch.no_grad():
        base = pipe.unet(x, t, encoder_hidden_states=ctx).sample
        pipe.load_lora_weights(lora_dir)
        loaded = pipe.unet(x, t, encoder_hidden_states=ctx).sample
        trained = trainer.model.unet(x, t, encoder_hidden_states=ctx).sample
    assert not torch.allclose(base, trained, atol=1e-4), "training changed nothing: the test would prove nothing"
    torch.testing.assert_close(loaded, trained, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides", [
    ["dag.algorithm=kl"],
    ["dag.algorithm=ddpo"],
    ["model.pretrained=tiny-random-ddpm", "prompts.source=empty", "sample.guidance_scale=1",
     "dag.flow.block_out_channels=[16,32]"],
    ["dag.reduce=sum", "train.timestep_fraction=0.5", "dag.xhat_rewards=recompute"],
    ["dag.step_weighting=score_scale", "train.timesteps_per_micro_step=2"],
])
def test_variants_train(tmp_path, overrides):
    rows = Trainer(tiny_cfg(tmp_path, *overrides)).fit()
    assert len(rows) == 1 and all(isinstance(v, float) for k, v in rows[0].items() if k != "epoch")
    assert all(torch.isfinite(torch.tensor(v)) for k, v in rows[0].items() if k != "epoch")


@pytest.mark.parametrize("stage", [0, 2])
def test_deepspeed_engine_matches_torch_engine(tmp_path, stage):
    """One optimizer step through DeepSpeed (ZeRO 0 and 2, gloo, single process) equals plain AdamW, and both
    log the same pre-clip gradient norm (at stage 0 DeepSpeed records none; the engine takes it itself)."""
    weights, grad_norms = {}, {}
    for backend in ("torch", "deepspeed"):
        trainer = Trainer(tiny_cfg(tmp_path, f"engine.backend={backend}", f"engine.zero_stage={stage}",
                                   f"logging.run_name={backend}"))
        grad_norms[backend] = trainer.fit()[0]["grad_norm"]
        weights[backend] = torch.cat([p.detach().flatten() for p in trainer.flow.parameters()])
        lora = trainer.model.lora_state_dict()
        weights[backend + "_lora"] = torch.cat([lora[k].flatten() for k in sorted(lora)])
    torch.testing.assert_close(weights["deepspeed"], weights["torch"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weights["deepspeed_lora"], weights["torch_lora"], rtol=1e-4, atol=1e-6)
    assert grad_norms["torch"] > 0 and grad_norms["deepspeed"] == pytest.approx(grad_norms["torch"], rel=1e-4)


def test_dag_db_raises_jpeg_compressibility(tmp_path):
    """Seeded DAG-DB on tiny-random: the mean reward of the last epochs beats the first epoch's clearly."""
    cfg = load_config(REPO / "configs/tiny_random_compress.yaml", [
        # the official flow network (default init, global pool) needs the larger flow step to keep up: at 3e-3 the
        # gain was 0.6 standard errors, at 1e-2 17 (with the compact flow 3e-3 gave 4.6)
        "train.epochs=8", "dag.beta=300", "train.learning_rate=1e-2", "train.flow_learning_rate=1e-2",
        "sample.num_batches_per_epoch=2", "engine.backend=torch", "logging.progress=false", "logging.grid_size=0",
        f"logging.output_dir={tmp_path}", "checkpoint.save_final=false",
    ])
    rows = Trainer(cfg).fit()
    first, last = rows[0], rows[-2:]
    gain = sum(r["reward_mean"] for r in last) / 2 - first["reward_mean"]
    stderr = first["reward_std"] / (cfg.trajectories_per_epoch ** 0.5)
    assert gain > 5 * stderr, (gain, stderr, [r["reward_mean"] for r in rows])


@pytest.mark.parametrize("algorithm", ["db", "kl"])
def test_triton_backend_matches_reference_in_training(tmp_path, algorithm, monkeypatch):
    """A tiny-random epoch through the Triton kernels (interpreter on CPU) gives the reference's losses."""
    from fastdag.kernels import dispatch

    if not dispatch.HAS_TRITON:
        pytest.skip("triton is not installed")
    calls = []
    for name in ("ddim_step_triton", "db_loss_triton", "rloo_advantages_triton"):
        fn = getattr(dispatch, name)
        monkeypatch.setattr(dispatch, name, lambda *a, _fn=fn, _name=name, **k: calls.append(_name) or _fn(*a, **k))
    rows = {}
    for backend in ("reference", "triton"):
        # A smooth reward (brightness): the backends agree to ~1e-7 in the latents, which JPEG size turns into
        # whole-byte flips of x̂_0 rewards (β = 10), so with it the verdict depended on the CPU it ran on.
        trainer = Trainer(tiny_cfg(tmp_path, f"kernels.backend={backend}", f"dag.algorithm={algorithm}",
                                   f"logging.run_name={backend}", "logging.grid_size=0", "reward.name=brightness"))
        rows[backend] = trainer.fit()[0]
    for key in ("reward_mean", "loss", "db_loss", "prox"):
        assert rows["triton"][key] == pytest.approx(rows["reference"][key], rel=1e-5, abs=1e-6), key
    expected = {"ddim_step_triton", "db_loss_triton"} | ({"rloo_advantages_triton"} if algorithm == "kl" else set())
    assert set(calls) == expected, "the triton backend must reach the Triton kernels"


def test_scoring_only_trained_states_gives_the_same_losses(tmp_path):
    """dag.xhat_states=trained scores fewer x̂_0 states but trains the same transitions to the same losses."""
    rows, scored, trajs = {}, {}, {}
    for states in ("all", "trained"):
        trainer = Trainer(tiny_cfg(tmp_path, f"dag.xhat_states={states}", "train.timestep_fraction=0.5",
                                   "sample.num_steps=8", "reward.name=brightness", "train.epochs=2",
                                   "checkpoint.save_final=false", "logging.grid_size=0", f"logging.run_name={states}"))
        trainer.reward = CountingReward(trainer.reward)
        plan_steps = []
        draw = trainer.draw_plan
        trainer.draw_plan = lambda n, T, _d=draw: plan_steps.append(_d(n, T)) or plan_steps[-1]
        rows[states] = trainer.fit()
        scored[states] = trainer.reward.images
        trajs[states] = (trainer.sample_epoch(), plan_steps[-1])
    for a, b in zip(rows["all"], rows["trained"]):
        for key in ("loss", "db_loss", "prox", "reward_mean"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    assert scored["trained"] < scored["all"]
    t, plan = trajs["trained"]
    mask = Trainer.trained_states(plan, t.num_steps)
    assert torch.isnan(t.xhat_rewards[~mask]).all() and torch.isfinite(t.xhat_rewards[mask]).all()
    assert not mask.all()


def test_cheap_xhat_decoder_decodes_intermediate_states_only(tmp_path):
    from diffusers import AutoencoderTiny

    from fastdag.config import ConfigError

    decoder_dir = tmp_path / "taesd"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        AutoencoderTiny(encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
                        num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(1, 1, 1)).save_pretrained(decoder_dir)
    out = {}
    for name, extra in (("vae", []), ("tiny", [f"dag.xhat_decoder={decoder_dir}"])):
        trainer = Trainer(tiny_cfg(tmp_path, "reward.name=brightness", *extra))
        assert (trainer.model.xhat_decoder is not None) == (name == "tiny")
        trajs = trainer.sample_epoch()
        out[name] = trajs
        trainer.train_epoch(trajs, beta=10.0)
    torch.testing.assert_close(out["tiny"].rewards, out["vae"].rewards)  # final samples: always the VAE
    assert out["tiny"].images.shape == out["vae"].images.shape
    assert not torch.allclose(out["tiny"].xhat_rewards, out["vae"].xhat_rewards)
    with pytest.raises(ConfigError, match="dag.xhat_decoder"):
        Trainer(tiny_cfg(tmp_path, f"dag.xhat_decoder={tmp_path / 'missing'}"))


@pytest.mark.parametrize("algorithm", ["db", "kl", "ddpo"])
def test_timesteps_per_micro_step_gives_the_same_training(tmp_path, algorithm):
    """Several timesteps in one forward/backward: same losses, same weights as one timestep at a time."""
    out = {}
    for k in (1, 4):
        # The compact flow's zero-initialised head: with the official one (random init) log F is non-zero from the
        # first step, and DAG-KL's 1e-4 ratio clip and Adam's normalised steps turn the batchings' 1e-7 rounding
        # differences into up to 2.5e-5 on a dozen near-zero-gradient weights (of 190k).
        trainer = Trainer(tiny_cfg(tmp_path, f"dag.algorithm={algorithm}", f"train.timesteps_per_micro_step={k}",
                                   "train.epochs=2", "reward.name=brightness", "checkpoint.save_final=false",
                                   "logging.grid_size=0", f"logging.run_name=k{k}", "dag.flow.architecture=compact"))
        rows = trainer.fit()
        lora = trainer.model.lora_state_dict()
        weights = [lora[name].flatten() for name in sorted(lora)]
        if trainer.flow is not None:
            weights += [p.detach().flatten() for p in trainer.flow.parameters()]
        out[k] = (rows, torch.cat(weights))
    assert out[4][0][-1]["reward_mean"] != out[4][0][0]["reward_mean"]  # the first update changed the samples
    for a, b in zip(out[1][0], out[4][0]):
        for key in ("loss", "reward_mean"):  # DDPO's loss is a mean of normalised advantages: ~0 ± 1e-6
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
    # Adam's normalised steps turn 1e-7 rounding differences of the batchings into up to a few 1e-6 on the odd
    # weight whose gradient is near zero; a real difference (other transitions) moves most weights by ~lr (3e-4).
    diff = (out[4][1] - out[1][1]).abs()
    assert diff.max() < 1e-5 and (diff > 1e-6).float().mean() < 1e-4, (diff.max(), (diff > 1e-6).sum())


def test_timesteps_per_micro_step_must_divide_the_trained_steps(tmp_path):
    from fastdag.config import ConfigError

    with pytest.raises(ConfigError, match="train.timesteps_per_micro_step: 3 does not divide the 4 trained"):
        Trainer(tiny_cfg(tmp_path, "train.timesteps_per_micro_step=3"))
