"""Runs many ``fastdag`` command lines in one interpreter (``python tests/cli_batch.py CASES.json OUT.json``):
each through ``fastdag.cli.main`` with file descriptor 2 captured, so the test sees exactly what a terminal would
(library prints and C-level writes included) without paying an interpreter and torch import per case.

A case is ``{"id", "argv", "hooks": [...], "env": {...}, "premodel": bool}``. ``premodel`` makes loading a model
an error of its own (the case must fail before), and ``hooks`` name the faults injected for it (below).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

import torch

from fastdag import cli, trainer as trainer_module
from fastdag.rewards import REWARDS


class ModelLoaded(BaseException):
    """Raised instead of loading a model in a case that must fail before (not caught by the CLI)."""


def _register_bad_rewards() -> None:
    class Raises:
        """test reward: raises"""

        def __call__(self, images, prompts):
            raise ValueError("the reward's own bug")

    REWARDS["test_raises"] = Raises
    REWARDS["test_none"] = lambda: (lambda images, prompts: None)
    REWARDS["test_strings"] = lambda: (lambda images, prompts: ["good"] * len(prompts))
    REWARDS["test_nan"] = lambda: (lambda images, prompts: torch.full((len(prompts),), float("nan")))


@contextlib.contextmanager
def _erofs():
    """The output directory is on a read-only mount (as root, chmod cannot make one)."""
    import fastdag.preflight as pre

    real = pre.tempfile.mkstemp

    def mkstemp(*a, **kw):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    pre.tempfile.mkstemp = mkstemp
    try:
        yield
    finally:
        pre.tempfile.mkstemp = real


@contextlib.contextmanager
def _enospc_in_epoch2():
    """The disk fills up while the epoch-2 checkpoint is written."""
    import fastdag.state_io as sio

    real = sio.save_file

    def save_file(tensors, path, *a, **kw):
        if "epoch-0002" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(tensors, path, *a, **kw)

    sio.save_file = save_file
    try:
        yield
    finally:
        sio.save_file = real


@contextlib.contextmanager
def _nan_loss_at(call: str):
    """The objective's loss is NaN at its ``call``-th evaluation in the run (once)."""
    real = trainer_module.build_objective
    calls = {"n": 0}

    class Poisoned:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __call__(self, terms):
            loss, metrics = self.inner(terms)
            calls["n"] += 1
            if calls["n"] == int(call):
                loss = loss * float("nan")
                metrics = {**metrics, "loss": loss.detach()}
            return loss, metrics

    trainer_module.build_objective = lambda *a, **kw: Poisoned(real(*a, **kw))
    try:
        yield
    finally:
        trainer_module.build_objective = real


HOOKS = {"erofs": _erofs, "enospc_epoch2": _enospc_in_epoch2, "nan_loss_at": _nan_loss_at}  # "name" or "name:arg"


@contextlib.contextmanager
def _premodel(on: bool):
    real = trainer_module.build_model

    def refuse(*a, **kw):
        raise ModelLoaded("the model started loading")

    if on:
        trainer_module.build_model = refuse
    try:
        yield
    finally:
        trainer_module.build_model = real


@contextlib.contextmanager
def _env(extra: dict[str, str]):
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_case(case: dict) -> dict:
    """Exit status and everything written to fd 2 for one command line."""
    with tempfile.TemporaryFile() as err:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(_env(case.get("env", {})))
                stack.enter_context(_premodel(case.get("premodel", False)))
                for hook in case.get("hooks", []):
                    name, _, arg = hook.partition(":")
                    stack.enter_context(HOOKS[name](*([arg] if arg else [])))
                try:
                    rc = cli.main(case["argv"])
                except SystemExit as e:  # argparse
                    rc = e.code if isinstance(e.code, int) else 1
                except ModelLoaded:
                    rc = "model-loaded"
                except BaseException:  # noqa: BLE001 - what would have been a traceback on the terminal
                    traceback.print_exc()
                    rc = 1
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        return {"id": case["id"], "rc": rc, "stderr": err.read().decode("utf-8", "replace")}


def main() -> None:
    cases = json.loads(Path(sys.argv[1]).read_text())
    _register_bad_rewards()
    results = [run_case(case) for case in cases]
    Path(sys.argv[2]).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
