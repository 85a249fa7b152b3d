"""The baselines as their reference code does them: DDPO's per-prompt stat tracking (ddpo-pytorch) and GRPO's group
advantages and KL to the base model (flow_grpo), each against an independent computation written here."""
from collections import defaultdict

import numpy as np
import pytest
import torch

from fastdag.objectives.advantages import PerPromptStatTracker, group_advantages
from fastdag.samplers import StepSchedule, ddim_step_schedule
from fastdag.objectives import GRPO, TransitionTerms
from fastdag.trainer import Trainer
from test_trainer import tiny_cfg


def test_per_prompt_stat_tracking_is_ddpo_pytorchs():
    """Buffers of the last 16 rewards per prompt, kept across epochs; the batch's statistics until 16 are seen."""
    rng = np.random.default_rng(0)
    tracker = PerPromptStatTracker(buffer_size=16, min_count=16)
    history: dict[str, list[float]] = defaultdict(list)
    for epoch in range(5):
        prompts = list(rng.choice(["cat", "dog", "owl"], size=24))
        rewards = rng.normal(size=24) + np.array([{"cat": 0, "dog": 3, "owl": -2}[p] for p in prompts])
        got = tracker.update(prompts, torch.tensor(rewards))
        expected = np.empty(24)
        for prompt in set(prompts):
            mine = np.array([r for p, r in zip(prompts, rewards) if p == prompt])
            history[prompt] = (history[prompt] + list(mine))[-16:]
            if len(history[prompt]) < 16:
                mean, std = rewards.mean(), rewards.std() + 1e-6
            else:
                mean, std = np.mean(history[prompt]), np.std(history[prompt]) + 1e-6
            expected[[p == prompt for p in prompts]] = (mine - mean) / std
        torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32))
    assert all(len(v) == 16 for v in tracker.state_dict().values())
    restored = PerPromptStatTracker(16, 16)
    restored.load_state_dict(tracker.state_dict())
    assert torch.equal(restored.update(["cat"], torch.tensor([0.5])), tracker.update(["cat"], torch.tensor([0.5])))


@pytest.mark.parametrize("std", ["group", "global", "none"])
def test_group_advantages_are_flow_grpos(std):
    prompts = ["a", "a", "a", "b", "b", "b", "c", "c", "c"]
    rewards = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0, 5.0, 5.0, 5.0])
    got = group_advantages(prompts, rewards, std)
    r = rewards.double().numpy()
    for g in range(3):
        mine = r[3 * g : 3 * g + 3]
        scale = {"group": np.std(mine) + 1e-4, "global": np.std(r) + 1e-4, "none": 1.0}[std]
        torch.testing.assert_close(got[3 * g : 3 * g + 3], torch.tensor((mine - mine.mean()) / scale).float())
    assert torch.equal(got[6:], torch.zeros(3))  # a group whose rewards are all equal teaches nothing


def test_grpo_kl_is_the_gaussian_kl_between_the_step_means():
    """kl_scale · mean((o_θ − o_ref)²) = mean((μ_θ − μ_ref)²) / (2σ²), μ computed here from the DDIM formula."""
    from diffusers import DDIMScheduler

    schedule = ddim_step_schedule(DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                clip_sample=False, set_alpha_to_one=False), 10, torch.device("cpu"))
    steps = torch.tensor([0, 4, 8])
    a, ap = schedule.alpha_t[steps].view(-1, 1, 1, 1), schedule.alpha_prev[steps].view(-1, 1, 1, 1)
    sigma = ((1 - ap) / (1 - a) * (1 - a / ap)).sqrt()
    x = torch.randn(3, 4, 5, 5)
    o, o_ref = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    mu = lambda out: ap.sqrt() * (x - (1 - a).sqrt() * out) / a.sqrt() + (1 - ap - sigma**2).sqrt() * out  # noqa: E731
    expected = (((mu(o) - mu(o_ref)) ** 2).flatten(1).mean(1) / (2 * sigma.flatten() ** 2)).mean()
    kl_scale = StepSchedule.score_scale(schedule, 1.0)[steps] ** 2 / 2
    b = 3
    terms = TransitionTerms(log_pf=torch.zeros(b), log_pb=torch.zeros(b), log_pf_old=torch.zeros(b), eps=o,
                            eps_old=o, advantages=torch.zeros(b), eps_ref=o_ref, kl_scale=kl_scale)
    loss, metrics = GRPO(ratio_clip=1e-4, adv_clip=5.0, kl_coef=0.5)(terms)
    torch.testing.assert_close(metrics["kl_ref"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, 0.5 * expected, rtol=1e-5, atol=1e-6)  # zero advantages: only the KL is left


def test_grpo_epoch_samples_groups_and_trains(tmp_path):
    trainer = Trainer(tiny_cfg(tmp_path, "dag.algorithm=grpo", "sample.group_size=2", "dag.grpo_kl_coef=0.04",
                               "reward.name=brightness"))
    trajs = trainer.sample_epoch()
    prompts = trainer._epoch_prompts
    assert prompts[0::2] == prompts[1::2] and len(prompts) == len(trajs)  # pairs of the same prompt
    assert not torch.equal(trajs.latents[0, -1], trajs.latents[1, -1])  # with their own noise
    adv = trainer.trajectory_advantages(trajs)
    torch.testing.assert_close(adv, group_advantages(prompts, trajs.rewards.cpu(), "group"))
    row = trainer.train_epoch(trajs, beta=0.0)
    assert row["kl_ref"] >= 0 and np.isfinite(row["loss"])
    # the KL's reference forward ran with the adapters off, and left them on for training
    lora = [p for n, p in trainer.model.unet.named_parameters() if "lora_" in n]
    assert lora and all(p.requires_grad for p in lora)


def test_grpo_needs_groups(tmp_path):
    from fastdag.config import ConfigError

    with pytest.raises(ConfigError, match="sample.group_size: GRPO"):
        tiny_cfg(tmp_path, "dag.algorithm=grpo")
    with pytest.raises(ConfigError, match="sample.group_size: must be >= 1 and divide"):
        tiny_cfg(tmp_path, "sample.group_size=3")


def test_ddpo_per_prompt_tracking_is_the_default_and_epoch_a_switch(tmp_path):
    for mode in ("per_prompt", "epoch"):
        trainer = Trainer(tiny_cfg(tmp_path, "dag.algorithm=ddpo", f"dag.ddpo_advantages={mode}",
                                   "reward.name=brightness", f"logging.run_name={mode}"))
        trajs = trainer.sample_epoch()
        adv = trainer.trajectory_advantages(trajs)
        r = trajs.rewards.cpu().double()
        expected = (r - r.mean()) / (r.std(unbiased=mode == "epoch") + (1e-6 if mode == "per_prompt" else 1e-8))
        torch.testing.assert_close(adv.cpu(), expected.float(), rtol=1e-4, atol=1e-4)  # first epoch: under min_count
        if mode == "per_prompt":
            assert sum(len(v) for v in trainer.stat_tracker.state_dict().values()) == len(trajs)


def test_ddpo_resume_restores_the_per_prompt_buffers(tmp_path):
    """4 epochs vs 2 + a resume for 3-4: the same rows, so the buffers (which decide epoch 3's advantages: without
    them it would fall back to the batch's statistics) came back from the checkpoint."""
    import json

    run = ["dag.algorithm=ddpo", "train.epochs=4", "checkpoint.every_n_epochs=1", "prompts.source=empty",
           "reward.name=brightness", "dag.stat_buffer=8", "dag.stat_min_count=6"]
    Trainer(tiny_cfg(tmp_path, *run, "logging.run_name=ref")).fit()
    resumed = Trainer(tiny_cfg(tmp_path, *run, "logging.run_name=resumed",
                               f"train.resume={tmp_path / 'ref/checkpoints/epoch-0002'}"))
    resumed.fit()

    def rows(name):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if not k.endswith("_seconds")} for line in lines]

    assert rows("resumed") == rows("ref")
    assert len(resumed.stat_tracker.state_dict()[""]) == 8
