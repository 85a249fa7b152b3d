"""Bad input through the real CLI: every case ends with exit status 2 and one line on stderr, never a traceback,
and where the input is known before a model loads, before it loads. Checkpoints cannot run code, runs are never
overwritten, divergence stops (or skips) visibly, Ctrl-C says where to resume, a single DeepSpeed process listens on
no network interface. Plus a seeded fuzz of config overrides (wrong types, non-finite, out of range).

The command lines run in one interpreter (tests/cli_batch.py, file descriptor 2 captured), so ~40 cases cost one
torch import; Ctrl-C needs a process of its own."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch

from fastdag import cli
from fastdag.config import config_help
from test_run_lock import hold

REPO = Path(__file__).resolve().parents[1]
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

# Two optimizer steps per epoch (two minibatches, no accumulation); the torch engine (no DeepSpeed start-up).
TINY = [
    "sample.num_steps=2", "sample.batch_size=4", "sample.num_batches_per_epoch=1", "train.batch_size=2",
    "train.gradient_accumulation_steps=1", "dag.beta=10", "dag.flow.block_out_channels=[32,64]",
    "dag.flow.norm_num_groups=8", "reward.name=brightness", "logging.progress=false", "logging.grid_size=0",
    "engine.backend=torch", "train.epochs=2", "checkpoint.every_n_epochs=1",
]


def train_argv(out: Path, name: str, *extra: str) -> list[str]:
    return ["train", *TINY, f"logging.output_dir={out}", f"logging.run_name={name}", *extra]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` by content: equal snapshots mean nothing was written, removed or added."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def strict_json_lines(path: Path) -> list[dict]:
    def refuse(name: str):
        raise AssertionError(f"{path} holds {name}, which is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


class Pwn:
    """A pickle that runs a command when loaded: what a shared checkpoint could hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant_malicious(directory: Path, marker: Path, files: tuple[str, ...] = ("trainer_state.pt",)) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "checkpoint.json").write_text(json.dumps({"epoch": 1, "world_size": 1}))
    for name in files:
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        with open(directory / name, "wb") as fh:
            pickle.dump(Pwn(marker), fh)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


class Case:
    def __init__(self, id: str, argv: list[str], needle: str = "", *, rc: int = 2, premodel: bool = False,
                 hooks: tuple[str, ...] = (), env: Optional[dict[str, str]] = None,
                 after: Optional[Callable[[dict], None]] = None, absent: tuple[str, ...] = ()):
        self.id, self.argv, self.needle, self.rc, self.premodel = id, argv, needle, rc, premodel
        self.hooks, self.env, self.after, self.absent = hooks, env or {}, after, absent

    def spec(self) -> dict:
        return {"id": self.id, "argv": self.argv, "hooks": list(self.hooks), "env": self.env, "premodel": self.premodel}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 2-epoch run with a checkpoint after each epoch (copied by the cases that need a run)."""
    out = tmp_path_factory.mktemp("trained")
    with contextlib.redirect_stderr(io.StringIO()):
        assert cli.main(train_argv(out, "run")) == 0
    return out / "run"


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """Billion laughs: ~600 bytes of YAML whose aliases expand to width ** levels strings."""
    lines = [f"a0: &a0 [{', '.join(['lol'] * width)}]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels + 1)]
    return "\n".join(lines)


def bomb_config() -> str:
    """The issue's probe: the bomb under reward.kwargs (under an unknown top-level key it was refused at once)."""
    return "reward:\n  name: brightness\n  kwargs:\n" + "".join(f"    {line}\n" for line in alias_bomb().splitlines())


def build_cases(root: Path, trained: Path, holder: int) -> list[Case]:
    """``holder``: the PID of a process holding the run directories root/busy and root/busy-resume."""
    cases: list[Case] = []

    def add(*args, **kwargs) -> None:
        cases.append(Case(*args, **kwargs))

    def copy_run(name: str) -> Path:
        shutil.copytree(trained, root / name)
        return root / name

    # --- point 5: input files and values --------------------------------------------------------------------
    binary = root / "binary.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    add("config-binary", ["train", "--config", str(binary)], "is not a text file", premodel=True)
    nul = root / "nul.yaml"
    nul.write_bytes(b"train:\n  epochs: 2\x00\x00\n")
    add("config-nul-bytes", ["train", "--config", str(nul)], "is not a text file", premodel=True)
    for suffix, body in ((".txt", b"caf\xe9 au lait\n"), (".csv", b"prompt\ncaf\xe9\n"), (".json", b'["caf\xe9"]')):
        path = root / f"latin1{suffix}"
        path.write_bytes(body)
        add(f"prompts-not-utf8{suffix}", train_argv(root, "p", f"prompts.source={path}"), "is not UTF-8 text",
            premodel=True)
    add("seed-negative", train_argv(root, "s", "train.seed=-1"), "train.seed: must be in", premodel=True)
    a_file = root / "a-file"
    a_file.write_text("not a directory")
    add("output-dir-is-a-file", train_argv(a_file, "r"), f"logging.output_dir: {a_file} is a file", premodel=True)
    add("output-dir-under-a-file", train_argv(a_file / "sub", "r"), "which is a file", premodel=True)
    add("output-dir-read-only-mount", train_argv(root / "ro", "r"), "Read-only file system", premodel=True,
        hooks=("erofs",))
    add("engine-mismatch-on-resume", train_argv(root, "mismatch", "engine.backend=deepspeed", "train.resume=latest"),
        "was written by the torch engine, this run uses deepspeed; resume with engine.backend=torch", premodel=True)
    copy_run("mismatch")
    norank = copy_run("norank")
    (norank / "checkpoints/epoch-0002/rank-00000.json").unlink()
    add("checkpoint-missing-rank-file", train_argv(root, "other", f"train.resume={norank / 'checkpoints/epoch-0002'}"),
        "is incomplete (no rank-00000.json)", premodel=True)
    broken = copy_run("broken")
    truncate(broken / "checkpoints/epoch-0002/trainer_state.safetensors")
    add("checkpoint-damaged-explicit", train_argv(root, "other2", f"train.resume={broken / 'checkpoints/epoch-0002'}"),
        "is damaged (trainer_state.json", premodel=True)
    badjson = copy_run("badjson")
    (badjson / "checkpoints/epoch-0002/checkpoint.json").write_text("{not json")
    add("checkpoint-json-damaged-explicit",
        train_argv(root, "other3", f"train.resume={badjson / 'checkpoints/epoch-0002'}"),
        "checkpoint.json is not a checkpoint record", premodel=True)

    fallback = copy_run("fallback")
    truncate(fallback / "checkpoints/epoch-0002/engine/torch_engine.safetensors")

    def fell_back(result: dict) -> None:
        assert f"falling back to {fallback / 'checkpoints/epoch-0001'}" in result["stderr"], result["stderr"]
        assert [r["epoch"] for r in strict_json_lines(fallback / "metrics.jsonl")] == [1, 2, 3]

    add("corrupt-newest-checkpoint-falls-back", train_argv(root, "fallback", "train.resume=latest", "train.epochs=3"),
        rc=0, after=fell_back)

    for reward, needle in (("test_none", "reward 'test_none' returned NoneType None, not numbers"),
                           ("test_strings", "reward 'test_strings' returned list ['good',"),
                           ("test_nan", "reward 'test_nan' returned non-finite values")):
        add(f"reward-{reward}", train_argv(root, reward, f"reward.name={reward}"), needle)

    def traceback_in_log(result: dict) -> None:
        log = (root / "test_raises/error.log").read_text()
        assert "Traceback" in log and "the reward's own bug" in log

    add("reward-raises", train_argv(root, "test_raises", "reward.name=test_raises"),
        f"epoch 1, rollout: reward 'test_raises' raised ValueError: the reward's own bug (traceback in "
        f"{root / 'test_raises/error.log'})", after=traceback_in_log)
    add("reward-kwargs", train_argv(root, "k", "reward.name=jpeg_compressibility", "reward.kwargs={quality: abc}"),
        "reward.kwargs.quality: must be an integer in [0, 100]", premodel=True)
    add("reward-prompts-outside-its-world",
        train_argv(root, "w", "reward.name=shapes_alignment", "prompts.source=tiny"),
        "prompts.source: reward 'shapes_alignment' does not take these prompts (not a shapes-world caption",
        premodel=True)
    add("eval-prompts-missing", train_argv(root, "e", f"eval.prompts={root / 'nope.txt'}"), "eval.prompts:",
        premodel=True)

    def disk_full_kept_epoch1(result: dict) -> None:
        ckpts = root / "full/checkpoints"
        assert (ckpts / "epoch-0001/checkpoint.json").is_file()
        assert not (ckpts / "epoch-0002").exists() and not (ckpts / "epoch-0002.tmp").exists()

    add("disk-full-during-save", train_argv(root, "full"),
        f"checkpoint epoch-0002: could not be written ({root / 'full/checkpoints/epoch-0002.tmp'}",
        hooks=("enospc_epoch2",), after=disk_full_kept_epoch1)
    add("profile-chart-under-a-file", ["profile", "--chart", str(a_file / "chart.png"), *TINY],
        "--chart: ", premodel=True)
    add("profile-chart-is-a-directory", ["profile", "--chart", str(root), *TINY], "is a directory", premodel=True)
    add("profile-table-under-a-file", ["profile", "--table", str(a_file / "t.md"), *TINY], "--table: ", premodel=True)

    # --- issue 21: what a config may cost, damaged files, NUL bytes, runs that collide, the reward server ---------
    bomb = root / "alias-bomb.yaml"
    bomb.write_text(bomb_config())
    add("config-alias-bomb", [*train_argv(root, "bomb"), "--config", str(bomb)],
        f"--config: {bomb}: YAML aliases expand the document past 100,000 values (line 9); a config needs far fewer",
        premodel=True)
    inline = "{" + ", ".join(alias_bomb(levels=7).splitlines()) + "}"
    add("override-alias-bomb", train_argv(root, "bomb", f"reward.kwargs={inline}"),
        "reward.kwargs: YAML aliases expand the document past 100,000 values", premodel=True)
    add("override-recursive-alias", train_argv(root, "bomb", "reward.kwargs={a: &a [*a]}"),
        "reward.kwargs: a YAML alias refers to its own anchor", premodel=True)
    add("override-nested-too-deeply", train_argv(root, "bomb", "reward.kwargs=" + "[" * 50000 + "]" * 50000),
        "reward.kwargs: the value is nested too deeply", premodel=True)
    huge = root / "huge.yaml"
    huge.write_text("# padding\n" * 200_000)
    add("config-too-large", ["train", "--config", str(huge)], f"--config: {huge} is larger than 1 MiB", premodel=True)
    long_value = root / "long-value.yaml"
    long_value.write_text("model:\n  device: " + "x" * 500_000 + "\n")

    def clipped(result: dict) -> None:
        assert len(result["stderr"]) < 400 and ("…" in result["stderr"] or "..." in result["stderr"])

    add("long-value-is-clipped", [*train_argv(root, "long"), "--config", str(long_value)],
        "model.device: must be auto, cpu, cuda, cuda:N or mps, got 'xxxx", premodel=True, after=clipped)
    for suffix, body, where in ((".txt", b"a cat\nthe\x00dog\n", "holds a NUL byte on line 2"),
                                (".csv", b"prompt\na cat\nthe\x00dog\n", "holds a NUL byte on line 3"),
                                (".json", b'["a cat", "the\\u0000dog"]', "prompt 2 of")):
        path = root / f"nul-prompts{suffix}"
        path.write_bytes(body)
        add(f"prompts-nul{suffix}", train_argv(root, "p", f"prompts.source={path}"), where, premodel=True)
    lora_run = copy_run("lora")
    lora_ckpt = lora_run / "checkpoints/epoch-0002"
    truncate(lora_ckpt / "pytorch_lora_weights.safetensors")
    add("evaluate-truncated-lora", ["evaluate", str(lora_ckpt), "eval.prompts=tiny", "eval.samples_per_prompt=1",
                                    "eval.num_steps=2"],
        f"{lora_ckpt}/pytorch_lora_weights.safetensors is damaged or not a safetensors file (Error while "
        "deserializing header")
    in_use = f"is in use by another fastdag run (PID {holder} on host {socket.gethostname()}, since "
    add("run-dir-in-use", train_argv(root, "busy"), f"logging.run_name: {root / 'busy'} {in_use}", premodel=True)
    add("resume-while-running", train_argv(root, "busy-resume", "train.resume=latest"),
        f"logging.run_name: {root / 'busy-resume'} {in_use}", premodel=True)
    add("serve-reward-on-the-network-without-token", ["serve-reward", "brightness", "--host", "0.0.0.0"],
        "--host: 0.0.0.0 is reachable from other machines; give --token SECRET", premodel=True)

    # --- point 6 ----------------------------------------------------------------------------------------------
    add("eta-above-1", train_argv(root, "x", "sample.eta=2"), "sample.eta: must be in [0, 1], got 2.0", premodel=True)
    add("guidance-negative", train_argv(root, "x", "sample.guidance_scale=-1"), "sample.guidance_scale: must be >= 0",
        premodel=True)
    dup = root / "dup.yaml"
    dup.write_text("train:\n  epochs: 2\n  epochs: 3\n")
    add("duplicate-yaml-key", ["train", "--config", str(dup)], "duplicate key 'epochs' (line 3)", premodel=True)
    add("config-is-a-directory", ["train", "--config", str(root)], "is a directory, not a YAML file", premodel=True)
    add("unknown-command", ["nonsense"], "unknown command 'nonsense'; commands: train, profile", premodel=True)
    add("empty-resume", train_argv(root, "x", "train.resume="), "train.resume: is empty", premodel=True)
    add("hub-error", train_argv(root, "hub", "model.pretrained=someone/not-a-model"),
        "model.pretrained: could not load 'someone/not-a-model'", env={"HF_HUB_OFFLINE": "1"},
        absent=("stacktrace", "stack trace", "Will try"))
    pipe_dir = root / "pipeline"
    from fastdag.families.presets import tiny_text_to_image_pipeline

    tiny_text_to_image_pipeline().save_pretrained(pipe_dir)
    add("no-progress-bars", train_argv(root, "quiet", f"model.pretrained={pipe_dir}", "train.epochs=1"), rc=0,
        absent=("Loading pipeline components", "it/s]", "%|"))

    # --- point 4: divergence ----------------------------------------------------------------------------------
    add("non-finite-beta", train_argv(root, "x", "dag.beta=inf"), "dag.beta: must be a finite number", premodel=True)
    add("non-finite-eta", train_argv(root, "x", "sample.eta=.inf"), "sample.eta: must be a finite number",
        premodel=True)
    add("non-finite-lr", train_argv(root, "x", "train.learning_rate=inf"), "must be a finite number", premodel=True)

    def no_checkpoint_valid_metrics(result: dict) -> None:
        assert not list((root / "huge-lr").glob("checkpoints/epoch-*"))
        assert strict_json_lines(root / "huge-lr/metrics.jsonl") == []

    add("huge-lr-diverges", train_argv(root, "huge-lr", "train.learning_rate=1e30"),
        "epoch 1, optimizer step 2 of 2: non-finite db_loss, loss, prox, residual_abs, grad_norm; the run stopped "
        "here and wrote no checkpoint", after=no_checkpoint_valid_metrics)

    def last_good_stays_latest(result: dict) -> None:
        assert [p.name for p in sorted((root / "nanstop/checkpoints").iterdir())] == ["epoch-0001"]
        assert [r["epoch"] for r in strict_json_lines(root / "nanstop/metrics.jsonl")] == [1]

    # 4 micro-steps an epoch, 2 per optimizer step: the 6th loss is epoch 2's first optimizer step
    add("nan-loss-stops", train_argv(root, "nanstop"), "epoch 2, optimizer step 1 of 2: non-finite loss",
        hooks=("nan_loss_at:6",), after=last_good_stays_latest)

    def skipped_and_counted(result: dict) -> None:
        rows = strict_json_lines(root / "nanskip/metrics.jsonl")
        assert [r["skipped_steps"] for r in rows] == [1, 0]
        from safetensors.torch import load_file

        weights = load_file(str(root / "nanskip/checkpoints/epoch-0002/pytorch_lora_weights.safetensors"))
        assert all(torch.isfinite(w).all() for w in weights.values())

    add("nan-loss-skipped", train_argv(root, "nanskip", "train.on_non_finite=skip"), rc=0,
        hooks=("nan_loss_at:2",), after=skipped_and_counted)

    # --- runs never overwritten; refused resumes change nothing; checkpoints cannot run code ---------------------
    rerun = copy_run("rerun")
    before_rerun = snapshot(rerun)
    add("rerun-without-resume", train_argv(root, "rerun"),
        f"logging.run_name: {rerun} already holds a run; continue it with train.resume=latest, or start a new run "
        "under another logging.run_name", premodel=True, after=lambda r: _unchanged(rerun, before_rerun))
    refused = copy_run("refused")
    before_refused = snapshot(refused)
    add("refused-resume-changes-nothing", train_argv(root, "refused", "lora.rank=8", "train.resume=latest"),
        "was trained with lora=", premodel=True, after=lambda r: _unchanged(refused, before_refused))
    marker = root / "PWNED"
    plant_malicious(root / "evil/epoch-0001", marker)
    add("malicious-checkpoint", train_argv(root, "victim", f"train.resume={root / 'evil/epoch-0001'}"),
        "is in the pickle format of an earlier fastdag, which can run code when read; it is not loaded",
        premodel=True, after=lambda r: _not_pwned(marker))
    return cases


def _unchanged(run: Path, before: dict[str, str]) -> None:
    assert snapshot(run) == before, "a refused run changed files in its directory"


def _not_pwned(marker: Path) -> None:
    assert not marker.exists(), "loading the checkpoint ran its code"


def run_batch(cases: list[Case], work: Path) -> dict[str, dict]:
    (work / "cases.json").write_text(json.dumps([c.spec() for c in cases]))
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, str(REPO / "tests/cli_batch.py"), str(work / "cases.json"),
                          str(work / "results.json")], capture_output=True, text=True, env=env, cwd=work, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return {r["id"]: r for r in json.loads((work / "results.json").read_text())}


def test_every_bad_input_is_one_line(tmp_path, trained):
    """Each case through ``fastdag.cli.main`` in one batch process: the exit status, exactly one line on stderr (the
    error) for failures, no traceback anywhere, failures before the model loads where the input is known then,
    and each case's own after-check (files unchanged, nothing executed, metrics still JSON, ...)."""
    shutil.copytree(trained, tmp_path / "busy-resume")
    holder = hold(tmp_path / "busy", tmp_path / "busy-resume")  # as a `fastdag train` of these runs would
    try:
        cases = build_cases(tmp_path, trained, holder.pid)
        results = run_batch(cases, tmp_path)
    finally:
        holder.kill()
        holder.wait()
    problems = []
    for case in cases:
        r = results[case.id]
        err = r["stderr"]
        lines = [line for line in err.splitlines() if line.strip()]
        try:
            assert r["rc"] != "model-loaded", "the model loaded before this input was refused"
            assert r["rc"] == case.rc, f"exit status {r['rc']}, expected {case.rc}"
            assert "Traceback" not in err, "a traceback on the terminal"
            if case.rc == 2:
                assert len(lines) == 1, f"{len(lines)} lines on stderr"
                assert lines[0].startswith("fastdag: error: ") and case.needle in lines[0], f"not {case.needle!r}"
            for text in case.absent:
                assert text not in err, f"{text!r} on stderr"
            if case.after is not None:
                case.after(r)
        except AssertionError as e:
            problems.append(f"{case.id}: {e}\n    stderr: {err.strip()[-600:]!r}")
    assert not problems, "\n".join(problems)
    assert len(cases) >= 55


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's /proc")
def test_alias_bomb_is_refused_fast_in_bounded_memory(tmp_path):
    """The issue's bomb (9 levels of billion laughs under reward.kwargs) cost 107 s, 9.6 GB and a 2 GB error line.
    Through the real CLI in a process of its own, under a 4 GiB address-space limit (so a regression fails the
    test rather than the machine): exit 2, one short line, peak RSS and time bounded."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(bomb_config())
    report = tmp_path / "maxrss"
    # VmHWM, not getrusage's ru_maxrss: on Linux the latter keeps the forking pytest worker's peak across exec
    code = ("import sys\nfrom fastdag.cli import main\nrc = main(sys.argv[2:])\nhwm = [l for l in "
            "open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]\n"
            "open(sys.argv[1], 'w').write(hwm)\nsys.exit(rc)")

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-c", code, str(report), "train", "--config", str(bomb),
                          f"logging.output_dir={tmp_path}"], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=300, preexec_fn=limit)
    seconds = time.monotonic() - t0
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.splitlines() == [f"fastdag: error: --config: {bomb}: YAML aliases expand the document past "
                                       "100,000 values (line 9); a config needs far fewer"]
    peak_mb = int(report.read_text()) / 1024  # KiB
    print(f"alias bomb: refused in {seconds:.2f} s, peak RSS {peak_mb:.0f} MB")
    assert peak_mb < 200 and seconds < 60  # torch alone is ~300 MB: refused before it is imported


# ----- the property test: random overrides of every config field --------------------------------------------------
WRONG_TYPE = {
    "int": ["abc", "1.5", "[1]", "{a: 1}", "true", ".nan", "1e3", "null"],
    "float": ["abc", "[1.0]", "{a: 1}", "true", "null", ".nan", ".inf", "-.inf", "nan", "inf", "-inf", "1e999"],
    "bool": ["maybe", "3", "[true]", "1.5", "null", "{a: 1}"],
    "str": ["3", "[a]", "{a: 1}", "true", "1.5", "null"],
    "optional_str": ["3", "[a]", "{a: 1}", "true", "1.5"],
    "optional_float": ["abc", ".nan", ".inf", "-.inf", "[1]", "true", "{a: 1}"],
    "optional_int": ["abc", "1.5", "[1]", "true", "{a: 1}"],
    "literal": ["bogus", "3", "[x]", "null", "true", "{a: 1}"],
    "list_str": ["abc", "3", "[1, 2]", "{a: 1}", "null", "[[a]]"],
    "list_int": ["abc", "[a]", "[1.5]", "3", "null", "[true]"],
    "mapping": ["3", "[1]", "abc", "null", "true"],
}
# Values of the right type that no run can use: each field's range, stated independently of config.py.
OUT_OF_RANGE = {
    "model.pretrained": ["''"], "model.device": ["gpu", "cuda:x", "''"],
    "lora.rank": ["0", "-3"], "lora.alpha": ["0", "-1.5"], "lora.target_modules": ["[]"],
    "sample.num_steps": ["0", "-1"], "sample.eta": ["-0.1", "1.5", "2"], "sample.guidance_scale": ["-1", "-0.5"],
    "sample.batch_size": ["0", "-4"], "sample.num_batches_per_epoch": ["0", "-1"],
    "train.epochs": ["0", "-1"], "train.batch_size": ["0", "-2", "3"], "train.gradient_accumulation_steps": ["0", "-1"],
    "train.num_inner_epochs": ["0"], "train.timesteps_per_micro_step": ["0", "-2"],
    "train.timestep_fraction": ["0", "1.5", "-0.2"], "train.learning_rate": ["0", "-1e-3"],
    "train.flow_learning_rate": ["0", "-1"], "train.adam_beta1": ["-0.1", "1", "1.5"],
    "train.adam_beta2": ["-0.1", "1"], "train.adam_weight_decay": ["-1e-4"], "train.adam_epsilon": ["0", "-1e-8"],
    "train.max_grad_norm": ["-1"], "train.seed": ["-1", str(2**63), str(2**64)], "train.resume": ["''"],
    "dag.beta": ["-1"], "dag.anneal_fraction": ["0", "1.5"], "dag.kl_coef": ["-1"], "dag.ratio_clip": ["0", "-1"],
    "dag.adv_clip": ["0", "-5"], "dag.prox_coef": ["-1"],
    "dag.flow.block_out_channels": ["[]", "[0]", "[-32]", "[30]"], "dag.flow.layers_per_block": ["0"],
    "dag.flow.attention_heads": ["0", "-8", "3"], "dag.flow.norm_num_groups": ["0", "-8"],
    "sample.group_size": ["0", "-2", "3"], "dag.stat_buffer": ["0", "-16"], "dag.stat_min_count": ["0"],
    "dag.grpo_kl_coef": ["-0.04"],
    "reward.batch_size": ["0", "-1"], "prompts.source": ["''"],
    "eval.samples_per_prompt": ["0"], "eval.num_steps": ["0"], "eval.guidance_scale": ["-1"],
    "eval.eta": ["-0.5", "3"], "eval.seed": ["-1"], "eval.grid_prompts": ["-1"], "eval.prompts": ["''"],
    "engine.zero_stage": ["-1", "4", "7"], "checkpoint.every_n_epochs": ["-1"], "checkpoint.keep_last": ["-1"],
    "logging.grid_size": ["-1"], "logging.run_name": ["..", "a/b", "''", "."], "logging.output_dir": ["''"],
}
SECTIONS_AS_SCALARS = ["train=3", "dag=[1]", "dag.flow=abc", "sample=true", "logging=1.5"]


def _kind(type_name: str) -> str:
    if "|" in type_name and "null" in type_name:
        base = type_name.replace(" | null", "")
        return {"str": "optional_str", "float": "optional_float", "int": "optional_int"}.get(base, "literal")
    if "|" in type_name:
        return "literal"
    return {"list of str": "list_str", "list of int": "list_int"}.get(type_name, type_name)


def fuzz_overrides(n: int, seed: int = 13) -> list[str]:
    """``n`` overrides, each invalid for its field: a wrong type, a non-finite number or an out-of-range value."""
    rng = random.Random(seed)
    fields = [(key, _kind(tp)) for key, tp, _, _ in config_help()]
    out = []
    while len(out) < n:
        key, kind = rng.choice(fields)
        pool = WRONG_TYPE[kind] + OUT_OF_RANGE.get(key, []) * 3  # the ranges drawn as often as the types
        out.append(f"{key}={rng.choice(pool)}" if rng.random() > 0.01 else rng.choice(SECTIONS_AS_SCALARS))
    return out


def test_fuzzed_overrides_are_one_line_each(tmp_path, monkeypatch):
    """≥ 500 seeded random overrides through ``fastdag.cli.main`` (in-process: the CLI's code path without 500
    interpreter starts): exit status 2 and exactly one line naming the section each time, never a traceback, and
    never a model load."""
    import fastdag.trainer

    def refuse(*a, **kw):
        raise AssertionError("a fuzzed override reached the model load")

    monkeypatch.setattr(fastdag.trainer, "build_model", refuse)
    overrides = fuzz_overrides(520)
    assert len(set(k.split("=")[0] for k in overrides)) >= 70  # every field, near enough
    failures = []
    for item in overrides:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = cli.main(["train", *TINY, f"logging.output_dir={tmp_path}", "logging.run_name=fuzz", item])
            except SystemExit as e:
                rc = e.code
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        section = item.split("=")[0].split(".")[0]
        if rc != 2 or len(lines) != 1 or not lines[0].startswith("fastdag: error: ") or section not in lines[0] \
                or "Traceback" in err.getvalue():
            failures.append(f"{item!r}: rc {rc}, stderr {err.getvalue()!r}")
    assert not failures, f"{len(failures)} of {len(overrides)}:\n" + "\n".join(failures[:20])


# ----- checkpoints: code-free formats, the fallback for each damaged file -------------------------------------------
def test_deepspeed_files_are_read_without_running_code(tmp_path):
    """DeepSpeed's own pickles go through torch.load(weights_only=True) with an allow-list: a planted one is
    refused as damaged and its payload never runs."""
    from fastdag.checkpoint import DamagedCheckpoint, check_checkpoint, engine_meta
    from fastdag.distributed import World
    from fastdag.state_io import safe_torch_load, save_state

    marker = tmp_path / "PWNED"
    ckpt = tmp_path / "epoch-0001"
    plant_malicious(ckpt, marker, files=("engine/deepspeed/mp_rank_00_model_states.pt",))
    meta = {"epoch": 1, "world_size": 1, "engine": engine_meta("deepspeed", 2)}
    (ckpt / "checkpoint.json").write_text(json.dumps(meta))
    save_state(ckpt / "trainer_state", {"epoch": 1, "beta_horizon": 2, "metrics": [], "evaluations": {},
                                        "config": {}, "world_size": 1})
    save_state(ckpt / "rank-00000", {"rng": {}, "weights_digest": "x"})
    with pytest.raises(DamagedCheckpoint, match="mp_rank_00_model_states.pt: Weights only load failed"):
        check_checkpoint(ckpt, World(), engine_meta("deepspeed", 2))
    with pytest.raises(pickle.UnpicklingError):
        safe_torch_load(ckpt / "engine/deepspeed/mp_rank_00_model_states.pt")
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["engine", "trainer_state", "rank", "checkpoint.json", "pickle"])
def test_latest_falls_back_past_each_kind_of_damage(tmp_path, trained, damage):
    from fastdag.checkpoint import engine_meta, newest_usable_checkpoint
    from fastdag.distributed import World

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    newest = run / "checkpoints/epoch-0002"
    if damage == "engine":
        truncate(newest / "engine/torch_engine.safetensors")
    elif damage == "trainer_state":
        (newest / "trainer_state.json").write_text('{"epoch": 2, "metr')
    elif damage == "rank":
        truncate(newest / "rank-00000.safetensors")
    elif damage == "checkpoint.json":
        (newest / "checkpoint.json").write_bytes(b"\xff\xfe")
    else:  # an old-format (pickle) checkpoint is never read
        (newest / "trainer_state.json").unlink()
        plant_malicious(newest, tmp_path / "PWNED")
    path, skipped = newest_usable_checkpoint(run / "checkpoints", World(), engine_meta("torch", 0))
    assert path == run / "checkpoints/epoch-0001"
    assert len(skipped) == 1 and str(newest) in skipped[0]
    assert not (tmp_path / "PWNED").exists()


# ----- Ctrl-C and the network -----------------------------------------------------------------------------------
def test_ctrl_c_is_one_line_saying_where_to_resume(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    proc = subprocess.Popen([sys.executable, "-m", "fastdag.cli", *train_argv(tmp_path, "run", "train.epochs=1000")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    first = tmp_path / "run/checkpoints/epoch-0001/checkpoint.json"
    deadline = time.monotonic() + 180
    while not first.exists():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint in 180 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == cli.EXIT_INTERRUPTED, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert re.match(rf"fastdag: interrupted; {re.escape(str(tmp_path))}/run/checkpoints/epoch-\d{{4}} is the latest "
                    rf"checkpoint: continue with train.resume=latest logging.output_dir={re.escape(str(tmp_path))} "
                    r"logging.run_name=run$", last), last


def test_sigterm_during_a_save_keeps_the_last_checkpoint(tmp_path):
    """SIGTERM (what `timeout`, Slurm, Kubernetes and torchrun send) while epoch 2's checkpoint is half written:
    exit status 2, one line naming epoch 1 as the checkpoint to resume, and epoch 1 intact."""
    from fastdag.checkpoint import STALL_ENV, STALL_MARKER, engine_meta, newest_usable_checkpoint
    from fastdag.distributed import World

    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    env[STALL_ENV] = "epoch-0002"
    proc = subprocess.Popen([sys.executable, "-m", "fastdag.cli", *train_argv(tmp_path, "run", "train.epochs=3")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    stalled = tmp_path / "run/checkpoints/epoch-0002.tmp" / STALL_MARKER
    deadline = time.monotonic() + 180
    while not stalled.exists():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "the save did not start in 180 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-2000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"fastdag: terminated (SIGTERM); {tmp_path}/run/checkpoints/epoch-0001 is the latest checkpoint: continue "
        f"with train.resume=latest logging.output_dir={tmp_path} logging.run_name=run")
    latest, skipped = newest_usable_checkpoint(tmp_path / "run/checkpoints", World(), engine_meta("torch", 0))
    assert latest == tmp_path / "run/checkpoints/epoch-0001" and not skipped
    assert not (tmp_path / "run/checkpoints/epoch-0002").exists()


def test_damaged_weight_files_are_one_line_config_errors(tmp_path):
    """Flow and reward weights a user points at: truncated, empty, another shape or not a checkpoint -> one line
    naming the file (the LoRA goes through the CLI in test_every_bad_input_is_one_line)."""
    from fastdag.checkpoint import FLOW_WEIGHTS, load_flow, save_flow
    from fastdag.config import ConfigError
    from fastdag.rewards.loading import load_state_dict

    flow = torch.nn.Linear(3, 2)
    save_flow(tmp_path, flow)
    truncate(tmp_path / FLOW_WEIGHTS)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path / FLOW_WEIGHTS))} is damaged or not a "
                                          r"safetensors file \(Error while deserializing header"):
        load_flow(tmp_path, flow)
    save_flow(tmp_path, torch.nn.Linear(4, 2))
    with pytest.raises(ConfigError, match=r"flow.safetensors: flow weights for another dag.flow \(size mismatch"):
        load_flow(tmp_path, flow)
    empty = tmp_path / "head.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"^reward.kwargs.model: .*head.safetensors is damaged or not a safetensors "
                                          r"file \(.*header too small\)$"):
        load_state_dict(empty)
    torch.save({"w": torch.zeros(3)}, tmp_path / "head.pt")
    truncate(tmp_path / "head.pt")
    with pytest.raises(ConfigError, match=r"^reward.kwargs.model: cannot read .*head.pt as a weights-only checkpoint"):
        load_state_dict(tmp_path / "head.pt")


def _listening_addresses() -> list[str]:
    """Local addresses of this process's listening TCP sockets (Linux /proc), hex as the kernel writes them."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                found.append(cols[1].split(":")[0])
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc/net")
def test_single_process_deepspeed_listens_on_loopback_only(tmp_path, monkeypatch):
    from fastdag.config import load_config
    from fastdag.distributed import shutdown
    from fastdag.trainer import Trainer

    for key in LAUNCHER_ENV:
        monkeypatch.delenv(key, raising=False)
    shutdown()
    try:
        Trainer(load_config(None, [*TINY, "engine.backend=deepspeed", f"logging.output_dir={tmp_path}"]))
        addresses = _listening_addresses()
    finally:
        shutdown()
    loopback = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1
    assert all(a in loopback for a in addresses), addresses


def test_a_swallowed_ctrl_c_still_stops_the_run():
    """Python drops a KeyboardInterrupt raised inside a __del__ or a GC callback; the handler also records the
    request, and the trainer raises it again between phases."""
    import fastdag.errors as errors

    previous = errors.install_stop_handler()
    try:
        try:
            errors.request_stop()
        except KeyboardInterrupt:
            pass  # as if swallowed
        from fastdag.trainer import Trainer

        with pytest.raises(KeyboardInterrupt):
            Trainer._in_epoch(0, "rollout", lambda: None)  # the next phase of the run
        errors.install_stop_handler()  # a new run starts clean
        errors.raise_if_stop_requested()
    finally:
        errors.restore_handlers(previous)
