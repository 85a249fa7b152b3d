"""The trainer only wires the components: config -> model (pipeline + LoRA + flow) -> rollout -> objective ->
engine -> checkpoint, metrics, samples."""
from __future__ import annotations

import logging
import random
import time
from functools import partial
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from fastdag import distributed
from fastdag.objectives.advantages import PerPromptStatTracker, epoch_normalised, group_advantages
from fastdag.checkpoint import (
    ENGINE_DIR, TRAINER_STATE, checkpoint_name, checkpoint_write_failed, engine_meta, prune_checkpoints, rank_file,
    read_checkpoint, save_checkpoint, save_flow, weights_digest,
)
from fastdag.config import Config, ConfigError, config_to_dict, save_config
from fastdag.divergence import DivergenceGuard
from fastdag.distributed import World
from fastdag.engine import build_engine, check_engine
from fastdag.errors import raise_if_stop_requested
from fastdag.evaluation import Evaluation, Evaluator, write_report
from fastdag.families import build_model, resolve_device
from fastdag.objectives import DDPO, GRPO, TransitionTerms, beta_at, build_objective
from fastdag.objectives.flow_network import FlowNetwork
from fastdag.outputs import MetricsLog, make_run_dir, save_sample_grid
from fastdag.preflight import (
    check_reward_prompts, check_run_dir, check_same_setup, choose_checkpoint, planned_run_dir, quiet_loading,
    release_run_dir,
)
from fastdag.prompts import PromptSampler, load_prompts
from fastdag.rewards import CheckedReward, RewardError, build_reward
from fastdag.profiling import PhaseTimer
from fastdag.tracking import build_tracker
from fastdag.rollout import OverlappedScorer, Trajectories, rollout_batch, score_latents, score_rollout
from fastdag.samplers import step_weights
from fastdag.state_io import save_state

log = logging.getLogger(__name__)
# Warn once when the first micro-step's recomputed log p_F is this far from the rollout's (metrics.jsonl has it).
LOGP_MISMATCH_WARN = 1e-3


def _fmt(scores: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in scores.items())


class Trainer:
    """One process of a run. Data-parallel: every process builds the same model from the same seed; each samples
    and trains on its share of every epoch (see ``fastdag.distributed``); rank 0 writes the outputs."""

    def __init__(self, cfg: Config, run_dir: Optional[Path] = None):
        self.cfg = cfg
        # cheap checks of the user's input first, so a bad prompt file or launch fails before a model loads
        self.world = World.from_env()
        self.num_train_steps = cfg.trained_timesteps
        self.micro_steps_per_minibatch = self.num_train_steps // cfg.train.timesteps_per_micro_step
        self.shard = distributed.shard(cfg, self.world, self.micro_steps_per_minibatch)
        device = resolve_device(cfg.model.device)
        check_engine(cfg, device, self.world)
        self._check_resume(run_dir)
        self._resume_checkpoint = self._preflight(run_dir)
        if device.type == "cuda" and device.index is None:
            torch.cuda.set_device(self.world.local_rank)  # one GPU per process on a node
        # Prompts and noise are drawn for the whole data-parallel batch from generators seeded alike on every
        # process; each process keeps its rows (``share``), so runs on 1 or N processes sample the same trajectories.
        self.prompts = PromptSampler(load_prompts(cfg.prompts), cfg.train.seed)
        self.reward = CheckedReward(cfg.reward.name, build_reward(cfg.reward.name, cfg.reward.kwargs), cfg.reward.batch_size)
        check_reward_prompts(cfg, self.reward.fn, self.prompts.prompts)
        if not cfg.logging.progress:
            quiet_loading()
        torch.manual_seed(cfg.train.seed)
        self.model, lora_params = build_model(cfg.model, cfg.lora)
        self.device = self.model.device
        if cfg.dag.xhat_decoder is not None:
            self.model.load_xhat_decoder(cfg.dag.xhat_decoder)
        # Per-phase timing for `fastdag profile` and the benchmarks; off (a no-op, no host syncs) in training.
        self.timer = PhaseTimer(enabled=False, device=self.device)
        # The family's sampler (DDIM for the UNets, the flow SDE for SD3/FLUX): schedule, step, log-probs, x̂_0.
        self.sampler = self.model.make_sampler(cfg.sample.num_steps, cfg.sample, reduce=cfg.dag.reduce,
                                               backend=cfg.kernels.backend)
        self.step_weights = step_weights(self.sampler.score_scale(), cfg.dag.step_weighting)
        self.objective = build_objective(cfg.dag, cfg.kernels.backend, gather=distributed.gather_rows)
        self.flow: Optional[FlowNetwork] = None
        if self.objective.uses_flow:
            self.flow = FlowNetwork(self.model.latent_shape[0], cfg.dag.flow, self.model.flow_cond_dim).to(self.device)
        self.engine = build_engine(
            cfg, self.model.denoiser, self.flow, lora_params,
            list(self.flow.parameters()) if self.flow is not None else [], self.shard, self.world, self.device,
        )
        self.uncond = self.model.encode_negative(cfg.sample.negative_prompt) if self.model.conditional else None
        self.evaluator = None
        if cfg.eval.prompts and self.world.is_main:
            self.evaluator = Evaluator(cfg, self.model, self.reward, self.uncond)
        if cfg.model.offload_text_encoders and self.model.conditional:
            self.model.offload_text_encoders(
                [*self.prompts.prompts, *(self.evaluator.prompts if self.evaluator is not None else [])])
        self.evaluations: dict[str, Evaluation] = {}
        self.noise = torch.Generator(self.device).manual_seed(cfg.train.seed)
        self.shuffle = torch.Generator().manual_seed(cfg.train.seed + 1)
        self.run_dir = run_dir
        self.epoch = 0  # epochs completed; the 0-based index of the next one
        # β anneals over this many epochs; a resumed run keeps its checkpoint's, so a longer train.epochs on
        # resume extends training without moving the schedule.
        self.beta_horizon = cfg.train.epochs
        self.rows: list[dict[str, Any]] = []  # the metrics rows so far (checkpointed)
        self.guard = DivergenceGuard(skip=cfg.train.on_non_finite == "skip")
        self._first_mismatch: Optional[torch.Tensor] = None  # [mean, max] |recomputed − recorded log p_F|
        self._warned_mismatch = False
        self._plan: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None
        self._epoch_prompts: list[str] = []  # the epoch's prompts over all processes, in global trajectory order
        # DDPO's per-prompt reward buffers persist across epochs (checkpointed)
        self.stat_tracker = PerPromptStatTracker(cfg.dag.stat_buffer, cfg.dag.stat_min_count)
        # GRPO's KL to the base model: KL per unit squared output difference at each step, (∂μ/∂o / σ_t)² / 2
        kl_scale = self.sampler.score_scale() ** 2 / 2
        self.kl_scale = torch.nan_to_num(kl_scale, nan=0.0)  # deterministic steps (σ = 0) have no KL term

    @property
    def main(self) -> bool:
        return self.world.is_main

    # ----- rollout -------------------------------------------------------------------------------------------
    def draw_plan(self, n: int, num_steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This process's visiting order for one epoch of its ``n`` trajectories, one (order [n], steps
        [n, T_train]) per inner epoch (CPU, local indices); minibatch m is ``order[m*b : (m+1)*b]``.

        Official schedule: shuffle samples; each sample visits its transitions in its own random order and trains
        on the first ``T_train`` of them. Drawn at rollout time so the x̂_0 scoring can be limited to the trained
        states (``dag.xhat_states: trained``); the draws are those the update would make, in the same order.

        The shuffle is drawn for the whole epoch, identically on every process, such that every process trains
        only on its own trajectories and the global minibatches do not depend on the number of processes: global
        trajectory j sits in column j % B of a minibatch of B (``train.batch_size``), and each column's trajectories
        are shuffled over the minibatches. Column c belongs to process c % world (as trajectory j to j % world).
        """
        world, rank, B = self.world.size, self.world.rank, self.cfg.train.batch_size
        total = n * world
        blocks = total // B
        plan = []
        for _ in range(self.cfg.train.num_inner_epochs):
            # minibatch m takes, in column c, trajectory blocks[m, c] * B + c
            rows = torch.stack([torch.randperm(blocks, generator=self.shuffle) for _ in range(B)], dim=1)  # [M, B]
            mine = (rows * B + torch.arange(B))[:, rank::world]  # [M, b] global indices, all ≡ rank (mod world)
            order = ((mine - rank) // world).reshape(-1)  # local indices
            step_order = torch.stack([torch.randperm(num_steps, generator=self.shuffle) for _ in range(total)])
            plan.append((order, step_order[rank::world, : self.num_train_steps]))
        return plan

    @staticmethod
    def trained_states(plan: list[tuple[torch.Tensor, torch.Tensor]], num_steps: int) -> torch.Tensor:
        """[n, T] bool: the states whose x̂_0 reward a planned epoch reads: x_t and x_{t-1} of every trained step
        (x_0 after the last step is scored with the true reward instead)."""
        n = plan[0][1].shape[0]
        mask = torch.zeros(n, num_steps + 1, dtype=torch.bool)
        for _, steps in plan:
            mask.scatter_(1, steps, True)
            mask.scatter_(1, steps + 1, True)
        return mask[:, :num_steps]

    def draw_prompts(self, n: int) -> list[str]:
        """A rollout batch's n prompts over all processes: n / G prompts, each G times in a row (G =
        ``sample.group_size``; GRPO's groups), every trajectory with its own noise."""
        g = self.cfg.sample.group_size
        return [p for p in self.prompts.sample(n // g) for _ in range(g)]

    def sample_epoch(self) -> Trajectories:
        cfg, T = self.cfg, self.sampler.num_steps
        self._epoch_prompts = []
        self.model.denoiser.eval()
        n = self.shard.trajectories
        self._plan = self.draw_plan(n, T)
        score_xhat = self.objective.uses_flow and cfg.dag.xhat_rewards == "rollout"
        mask = self.trained_states(self._plan, T) if score_xhat and cfg.dag.xhat_states == "trained" else None
        # Phase timing needs the work serialised; overlapping would hide the scoring inside the denoising.
        scorer = OverlappedScorer(self.device, cfg.dag.xhat_overlap and not self.timer.enabled)
        b, parts = self.shard.rollout_batch, []
        rank, world = self.world.rank, self.world.size
        try:
            with self.timer.stage("rollout"):
                for k in range(cfg.sample.num_batches_per_epoch):
                    everyone = self.draw_prompts(cfg.sample.batch_size)
                    self._epoch_prompts += everyone
                    prompts = everyone[rank::world]
                    rollout = rollout_batch(
                        self.model, self.sampler, prompts, guidance_scale=cfg.sample.guidance_scale,
                        uncond=self.uncond, generator=self.noise, keep_xhat=score_xhat,
                        cuda_graphs=cfg.sample.cuda_graphs,
                        timer=self.timer, share=(rank, world),
                    )
                    batch_mask = mask[k * b : (k + 1) * b] if mask is not None else None
                    job = partial(score_rollout, self.model, self.reward, rollout, reward_batch_size=cfg.reward.batch_size,
                                  xhat_mask=batch_mask, timer=self.timer)
                    keep = tuple(t for t in (rollout.latents, rollout.xhat) if t is not None)
                    parts.append(scorer.submit(job, keep))
                trajs = Trajectories.cat([part.result() for part in parts])
        finally:
            scorer.close()
        return trajs

    # ----- update --------------------------------------------------------------------------------------------
    def _xhat_rewards_now(self, x: torch.Tensor, steps: torch.Tensor, cond, prompts) -> torch.Tensor:
        """The official per-transition recompute: a conditional forward of the current model, decode, score."""
        with torch.no_grad():
            with self.timer.phase("unet"):
                _, eps_cond = self.model.predict(x, self.sampler.timesteps[steps], cond, self.uncond, 1.0)
                xhat = self.sampler.xhat0(eps_cond, x, steps)
            return score_latents(self.model, self.reward, xhat, prompts, self.cfg.reward.batch_size, cheap=True,
                                 timer=self.timer)[0].to(self.device)

    def transition_terms(self, trajs: Trajectories, idx: torch.Tensor, steps: torch.Tensor, beta: float,
                         advantages: Optional[torch.Tensor] = None) -> TransitionTerms:
        """Evaluate the current model on transitions ``steps`` [b] of trajectories ``idx`` [b]."""
        cfg, sampler, T = self.cfg, self.sampler, trajs.num_steps
        x_t, x_prev = trajs.latents[idx, steps], trajs.latents[idx, steps + 1]
        t = sampler.timesteps[steps]
        cond = trajs.prompt_embeds[idx] if trajs.prompt_embeds is not None else None
        timer = self.timer
        with timer.phase("unet"):
            eps, _ = self.model.predict(x_t, t, cond, self.uncond, cfg.sample.guidance_scale)
        with timer.phase("step"):
            out = sampler.step(eps, x_t, steps, x_prev=x_prev)
        terms = TransitionTerms(
            log_pf=out.log_pf, log_pb=out.log_pb, log_pf_old=trajs.log_pf[idx, steps], eps=eps,
            eps_old=trajs.eps[idx, steps], advantages=advantages,
            weights=None if self.step_weights is None else self.step_weights[steps],
        )
        if isinstance(self.objective, GRPO) and self.objective.kl_coef > 0:
            with torch.no_grad(), self.model.adapters_disabled():
                terms.eps_ref, _ = self.model.predict(x_t, t, cond, self.uncond, cfg.sample.guidance_scale)
            terms.kl_scale = self.kl_scale[steps]
        if self.flow is None:
            return terms
        terminal = steps == T - 1
        next_steps = (steps + 1).clamp_max(T - 1)  # a placeholder at the last step, masked below
        t_prev = sampler.timesteps[next_steps]
        final_r = trajs.rewards[idx]
        if trajs.xhat_rewards is not None:
            r_t, r_prev = trajs.xhat_rewards[idx, steps], trajs.xhat_rewards[idx, next_steps]
        else:
            prompts = [trajs.prompts[i] for i in idx.tolist()]
            r_t = self._xhat_rewards_now(x_t, steps, cond, prompts)
            r_prev = self._xhat_rewards_now(x_prev, next_steps, cond, prompts)
        r_prev = torch.where(terminal, final_r, r_prev)
        # One flow forward on both states of every transition. The flow's weights are fp32; in a bf16 run it runs
        # under the model's autocast (as the official code's flow), so it takes the bf16 prompt embeddings.
        with timer.phase("flow"), self.model.autocast():
            both = self.flow(torch.cat([x_t, x_prev]), torch.cat([t, t_prev]),
                             None if cond is None else torch.cat([cond.embeds, cond.embeds]))
        f_t, f_prev = both.chunk(2)
        # Forward-looking flow: log F(x) = F_φ(x) + β r(x̂_0(x)); log F(x_0) := β r(x_0).
        terms.log_flow_t = f_t + beta * r_t
        terms.log_flow_prev = torch.where(terminal, beta * final_r, f_prev + beta * r_prev)
        return terms

    def _micro_step_loss(self, trajs: Trajectories, idx: torch.Tensor, steps: torch.Tensor, beta: float,
                         advantages: Optional[torch.Tensor], groups: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        terms = self.transition_terms(trajs, idx, steps, beta, advantages)
        terms.groups = groups
        if self._first_mismatch is None:
            # Before the epoch's first optimizer step the policy is the rollout's: the recomputed log p_F must
            # equal the recorded one, or every ratio (and DAG-KL's clip) starts off 1. Kept as tensors: no sync.
            diff = (terms.log_pf.detach().float() - terms.log_pf_old.float()).abs()
            self._first_mismatch = torch.stack([diff.mean(), diff.max()])
        with self.timer.phase("step"):
            return self.objective(terms)

    def trajectory_advantages(self, trajs: Trajectories) -> torch.Tensor:
        """DDPO's or GRPO's advantages [n] of this process's trajectories, computed from the whole epoch's rewards
        and prompts over all processes (every process computes the same, then keeps its rows)."""
        dag = self.cfg.dag
        rewards = distributed.gather_trajectory_values(trajs.rewards).cpu()  # [N], global order
        if dag.algorithm == "grpo":
            advantages = group_advantages(self._epoch_prompts, rewards, dag.grpo_std)
        elif dag.ddpo_advantages == "per_prompt":
            advantages = self.stat_tracker.update(self._epoch_prompts, rewards)
        else:
            advantages = epoch_normalised(rewards)
        # global trajectory rank + world * i is this process's trajectory i
        return advantages[self.world.rank :: self.world.size].to(self.device)

    def train_epoch(self, trajs: Trajectories, beta: float, progress: Optional[tqdm] = None) -> dict[str, float]:
        with self.timer.stage("update"):
            return self._train_epoch(trajs, beta, progress)

    def _train_epoch(self, trajs: Trajectories, beta: float, progress: Optional[tqdm]) -> dict[str, float]:
        n, T = len(trajs), trajs.num_steps
        self.model.denoiser.train()
        advantages = self.trajectory_advantages(trajs) if isinstance(self.objective, DDPO) else None
        sums: dict[str, torch.Tensor] = {}
        count = 0
        # The plan drawn at rollout time (it decided which x̂_0 states were scored), or a fresh one.
        plan = self._plan if self._plan is not None and len(self._plan[0][0]) == n else self.draw_plan(n, T)
        self._plan = None
        timer = self.timer
        chunk = self.cfg.train.timesteps_per_micro_step
        micro_steps = len(plan) * (n // self.shard.train_batch) * (self.num_train_steps // chunk)
        updates, total_updates = 0, micro_steps // self.shard.micro_steps_per_update
        self.guard.skipped = 0
        self._first_mismatch = None
        for order, step_order in plan:
            # Drawn on the host for reproducibility, moved to the device once per pass.
            order, step_order = order.to(self.device), step_order.to(self.device)  # [N], [N, T_train]
            b = self.shard.train_batch
            for start in range(0, n, b):
                idx = order[start : start + b]
                for j in range(0, self.num_train_steps, chunk):
                    # `chunk` timesteps of the minibatch in one forward, timestep-major: [chunk * b] transitions
                    steps = step_order[idx, j : j + chunk].T.reshape(-1)
                    rows = idx.repeat(chunk)
                    adv = advantages[rows] if advantages is not None else None
                    loss, metrics = self.engine.forward(
                        partial(self._micro_step_loss, trajs, rows, steps, beta, adv, chunk))
                    with timer.phase("backward"):
                        self.engine.backward(loss)
                    with timer.phase("optimizer"):
                        updated = self.engine.step()
                    self.guard.observe(metrics)
                    if updated:  # the step's micro-steps count unless it was skipped (or the run stops here)
                        updates += 1
                        for kept in self.guard.settle(self.engine.grad_norm, self.epoch + 1, updates, total_updates):
                            for k, v in kept.items():
                                sums[k] = sums.get(k, 0) + v
                            count += 1
                    if progress is not None:
                        progress.update(1)
        # means over this process's micro-steps, then over the processes (equal counts): the global means
        keys = sorted(sums)
        out: dict[str, float] = {}
        if keys:  # none when every optimizer step of the epoch was skipped (the same on every process)
            means = distributed.mean_over_ranks(torch.stack([sums[k] / count for k in keys]).float())
            out = dict(zip(keys, means.tolist()))
        out["grad_norm"] = float(self.engine.grad_norm)
        if self._first_mismatch is not None:  # the processes' means of their first micro-step's mean and max
            out["logp_mismatch_mean"], out["logp_mismatch_max"] = \
                distributed.mean_over_ranks(self._first_mismatch.float()).tolist()
            if out["logp_mismatch_max"] > LOGP_MISMATCH_WARN and not self._warned_mismatch:
                self._warned_mismatch = True
                log.warning("the update's recomputed log p_F differs from the rollout's by up to %.2g before the "
                            "first optimizer step (logp_mismatch_max, warned once): the two passes do not compute "
                            "the same thing (dtype, batch-dependent kernels, dropout), so ratios start off 1",
                            out["logp_mismatch_max"])
        for name, norm in (self.engine.clipper.norms if self.engine.clipper else {}).items():  # pre-clip, per group
            out[f"grad_norm_{name}"] = float(norm)
        if self.guard.skip:
            out["skipped_steps"] = self.guard.skipped
        return out

    # ----- loop ----------------------------------------------------------------------------------------------
    def fit(self) -> list[dict[str, Any]]:
        try:
            return self._fit()
        finally:  # however the run ends, its directory is free for the next one (a resume)
            release_run_dir(self.run_dir if self.run_dir is not None else planned_run_dir(self.cfg))

    def _fit(self) -> list[dict[str, Any]]:
        cfg = self.cfg
        if self.run_dir is None:  # rank 0 names and creates it; every process writes its checkpoint parts there
            made = str(make_run_dir(cfg, write_config=False)) if self.main else None
            self.run_dir = Path(distributed.broadcast_object(made))
        run_dir = self.run_dir
        metrics_log = MetricsLog(run_dir / "metrics.jsonl")
        # rank 0's pick (checked in the constructor), so every process resumes from the same one
        checkpoint = distributed.broadcast_object(self._resume_checkpoint if self.main else None)
        if checkpoint is not None:
            self.restore(checkpoint)
        if self.main:
            save_config(cfg, run_dir / "config.yaml")  # after the resume is accepted: a refused one changes no file
            (run_dir / "samples").mkdir(exist_ok=True)
            metrics_log.rewrite(self.rows)  # rows past the checkpoint (written before a crash) are dropped
        tracker = build_tracker(cfg.logging.tracker if self.main else "none", run_dir, config_to_dict(cfg))
        if self.evaluator is not None and "before" not in self.evaluations:
            self.evaluations["before"] = self.evaluator()
            log.info("base model on %s: %s", cfg.eval.prompts, _fmt(self.evaluations["before"].scores))
        minibatches = self.shard.trajectories // self.shard.train_batch
        updates_per_epoch = cfg.train.num_inner_epochs * minibatches * self.micro_steps_per_minibatch
        epochs = tqdm(range(self.epoch, cfg.train.epochs), desc="epochs", unit="epoch",
                      disable=not (cfg.logging.progress and self.main))
        for epoch in epochs:
            beta = beta_at(epoch, cfg.dag, self.beta_horizon)
            t0 = time.perf_counter()
            epochs.set_postfix_str("rollout")
            trajs = self._in_epoch(epoch, "rollout", self.sample_epoch)
            t1 = time.perf_counter()
            epochs.set_postfix_str("update")
            with tqdm(total=updates_per_epoch, desc=f"epoch {epoch + 1} update", leave=False, unit="step",
                      disable=not (cfg.logging.progress and self.main)) as bar:
                losses = self._in_epoch(epoch, "update", self.train_epoch, trajs, beta, bar)
            t2 = time.perf_counter()
            r = distributed.gather_trajectory_values(trajs.rewards)  # the epoch's rewards on all processes
            row = {
                "epoch": epoch + 1, "reward_mean": r.mean().item(), "reward_std": r.std().item() if len(r) > 1 else 0.0,
                "reward_min": r.min().item(), "reward_max": r.max().item(), "beta": beta, **losses,
                "rollout_seconds": t1 - t0, "update_seconds": t2 - t1,
            }
            self.rows.append(row)
            self.epoch = epoch + 1
            if self.main:
                if cfg.logging.grid_size:  # this process's samples
                    k = min(cfg.logging.grid_size, len(trajs))
                    save_sample_grid(run_dir / "samples" / f"epoch-{epoch + 1:04d}.png", trajs.images[:k],
                                     trajs.prompts[:k], trajs.rewards[:k])
                    tracker.log_image("samples", run_dir / "samples" / f"epoch-{epoch + 1:04d}.png", epoch + 1)
                metrics_log.write(row)
                tracker.log_row(row, epoch + 1)
            epochs.set_postfix(reward=f"{row['reward_mean']:.4g}", loss=f"{row.get('loss', float('nan')):.4g}")
            last = epoch + 1 == cfg.train.epochs
            every = cfg.checkpoint.every_n_epochs
            if (last and cfg.checkpoint.save_final) or (every and (epoch + 1) % every == 0):
                self.save(run_dir / "checkpoints" / checkpoint_name(epoch + 1))
        if self.evaluator is not None:
            self.evaluations["after"] = self.evaluator()
            log.info("after training on %s: %s", cfg.eval.prompts, _fmt(self.evaluations["after"].scores))
        if self.main:
            report = write_report(run_dir, metrics_log.read(), self.evaluations.get("before"),
                                  self.evaluations.get("after"), self.evaluator,
                                  f"fastdag: {cfg.dag.algorithm} on {cfg.model.pretrained} with {cfg.reward.name}")
            log.info("report: %s", report)
        tracker.close()
        return self.rows

    @staticmethod
    def _in_epoch(epoch: int, phase: str, fn, *args):
        """``fn(*args)``, a reward's failure named with the epoch and phase it happened in."""
        raise_if_stop_requested()
        try:
            return fn(*args)
        except RewardError as e:
            err = RewardError(f"epoch {epoch + 1}, {phase}: {e}")
            err.details = getattr(e, "details", None)
            raise err from None

    # ----- checkpoints ---------------------------------------------------------------------------------------
    def _check_resume(self, run_dir: Optional[Path]) -> None:
        """Resume settings that cannot work, before any model loads."""
        resume = self.cfg.train.resume
        if resume == "latest" and run_dir is None and not self.cfg.logging.run_name:
            raise ConfigError("train.resume: latest needs logging.run_name, the run to resume "
                              "(or give the path of a checkpoint directory)")
        if resume not in (None, "latest") and not Path(resume).is_dir():
            raise ConfigError(f"train.resume: {resume!r} is neither latest nor a checkpoint directory")

    def _preflight(self, run_dir: Optional[Path]) -> Optional[Path]:
        """The output directory, the run directory and the checkpoint to resume from, checked before any model
        loads; returns that checkpoint (None: a fresh start)."""
        run_dir = run_dir if run_dir is not None else planned_run_dir(self.cfg)
        check_run_dir(self.cfg, run_dir, self.world)  # takes the run directory's lock (rank 0)
        return choose_checkpoint(self.cfg, run_dir, self.world)

    def _rng_state(self) -> dict[str, Any]:
        """Every random state this process draws from: a resume continues each stream where it stopped."""
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        return {
            "torch": torch.get_rng_state(), "cuda": cuda, "numpy": np.random.get_state(), "python": random.getstate(),
            "noise": self.noise.get_state(), "shuffle": self.shuffle.get_state(), "prompts": self.prompts.state_dict(),
        }

    def _set_rng_state(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        if state["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        np.random.set_state(state["numpy"])
        random.setstate(state["python"])
        self.noise.set_state(state["noise"])
        self.shuffle.set_state(state["shuffle"])
        self.prompts.load_state_dict(state["prompts"])

    def save(self, directory: Path) -> Path:
        """A checkpoint of everything a resume needs, written collectively (every process calls this)."""
        rank_state = {"rng": self._rng_state(), "weights_digest": weights_digest(self.engine.module)}
        trainer_state = {
            "epoch": self.epoch, "beta_horizon": self.beta_horizon, "metrics": self.rows,
            "evaluations": {k: _pack_evaluation(v) for k, v in self.evaluations.items()},
            "stat_tracker": self.stat_tracker.state_dict(),
            "config": config_to_dict(self.cfg), "world_size": self.world.size,
        }

        def every_rank(tmp: Path) -> None:
            self.engine.save(tmp / ENGINE_DIR)
            save_state(tmp / rank_file(self.world.rank), rank_state)

        def main_rank(tmp: Path) -> None:
            self.model.save_lora(tmp)
            if self.flow is not None:
                save_flow(tmp, self.flow)
            save_state(tmp / TRAINER_STATE, trainer_state)

        meta = {"epoch": self.epoch, "world_size": self.world.size,
                "engine": engine_meta(self.cfg.engine.backend, self.cfg.engine.zero_stage)}
        try:
            save_checkpoint(directory, self.world, every_rank=every_rank, main_rank=main_rank, meta=meta)
        except OSError as e:  # a full disk, a lost mount: the half-written .tmp is never a checkpoint
            raise checkpoint_write_failed(directory, e) from e
        if self.main:
            prune_checkpoints(directory.parent, self.cfg.checkpoint.keep_last)
        return directory

    def restore(self, directory: Path) -> None:
        """Continue from a checkpoint: weights, optimizer, RNG streams, epoch, β horizon, metrics so far."""
        trainer_state, rank_state = read_checkpoint(directory, self.world)
        check_same_setup(trainer_state["config"], config_to_dict(self.cfg), directory)
        self.engine.load(directory / ENGINE_DIR)
        if weights_digest(self.engine.module) != rank_state["weights_digest"]:
            raise ConfigError(f"train.resume: {directory} is damaged (the restored weights differ from the saved ones)")
        self._set_rng_state(rank_state["rng"])
        self.epoch, self.beta_horizon = trainer_state["epoch"], trainer_state["beta_horizon"]
        self.rows = list(trainer_state["metrics"])
        self.evaluations = {k: _unpack_evaluation(v) for k, v in trainer_state["evaluations"].items()}
        self.stat_tracker.load_state_dict(trainer_state.get("stat_tracker", {}))
        log.info("resumed from %s after epoch %d of %d", directory, self.epoch, self.cfg.train.epochs)


def _pack_evaluation(e: Evaluation) -> dict[str, Any]:
    # uint8 images: 4x smaller, and the report's grids are uint8 anyway (lossless for them)
    return {"scores": e.scores, "prompts": e.prompts, "images": (e.images.clamp(0, 1) * 255).round().to(torch.uint8)}


def _unpack_evaluation(d: dict[str, Any]) -> Evaluation:
    return Evaluation(d["scores"], d["prompts"], d["images"].float() / 255)
