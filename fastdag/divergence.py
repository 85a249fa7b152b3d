"""Divergence is never silent: a non-finite loss term or gradient norm stops the run at the optimizer step where it
appears (``train.on_non_finite: stop``), or that step is skipped and counted (``skip``).

The engines drop a step whose gradients are not finite (TorchEngine and DeepSpeed ZeRO 0 here, ZeRO 1/2 by
DeepSpeed's own overflow check on the gradient norm, which in bf16 needs its ``check_grad_overflow``), so the
weights never take NaN; this guard decides, once per optimizer step, whether
the run may go on. That is one host sync per optimizer step (not per micro-step): the loss terms of the step's
micro-steps and the gradient norm are checked together. Over N processes the verdict is averaged, so every process
stops (or skips) at the same step. Non-finite rewards stop the run in ``CheckedReward`` whatever this setting.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from fastdag import distributed
from fastdag.errors import RunStopped

log = logging.getLogger(__name__)


class Diverged(RunStopped):
    """The run stopped on a non-finite value; the message names the epoch, the step and the term (one line)."""


class DivergenceGuard:
    def __init__(self, skip: bool):
        self.skip = skip
        self.skipped = 0  # steps skipped in the current epoch (reset by the trainer)
        self._pending: list[dict[str, torch.Tensor]] = []

    def observe(self, metrics: dict[str, torch.Tensor]) -> None:
        """A micro-step's loss terms (0-dim tensors), held until its optimizer step is settled; no host sync.
        Copied, since they are read after later micro-steps have run (a kernel may reuse an output buffer)."""
        values = torch.stack([v.detach().float().reshape(()) for v in metrics.values()])  # [K], one copy of all
        self._pending.append(dict(zip(metrics, values.unbind())))

    def settle(self, grad_norm: Optional[torch.Tensor], epoch: int, step: int,
               steps: int) -> list[dict[str, torch.Tensor]]:
        """At an optimizer step (after the engine's step): the micro-steps' metrics to keep (all of them, or none
        for a skipped step); :class:`Diverged` in stop mode when a term or the gradient norm is not finite."""
        pending, self._pending = self._pending, []
        if not pending:
            return pending
        keys = sorted(pending[0])
        values = torch.stack([torch.stack([m[k] for k in keys]) for m in pending])  # [n, K]
        flags = ~torch.isfinite(values).all(dim=0)  # [K]
        names = list(keys)
        if grad_norm is not None:
            norm = torch.as_tensor(grad_norm, dtype=torch.float32).to(flags.device).reshape(1)
            flags = torch.cat([flags, ~torch.isfinite(norm)])
            names.append("grad_norm")
        bad = (distributed.mean_over_ranks(flags.float()) > 0).tolist()  # the one host sync (and collective)
        if not any(bad):
            return pending
        terms = [n for n, b in zip(names, bad) if b]
        where = f"epoch {epoch}, optimizer step {step} of {steps}"
        if self.skip:
            self.skipped += 1
            log.info("%s: non-finite %s; step skipped (train.on_non_finite=skip)", where, ", ".join(terms))
            return []
        raise Diverged(f"{where}: non-finite {', '.join(terms)}; the run stopped here and wrote no checkpoint "
                       "(the last one stays latest). Lower train.learning_rate, or set "
                       "train.on_non_finite=skip to skip such steps")
