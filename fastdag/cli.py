"""The ``fastdag`` command: ``fastdag train --config X [key=value ...]`` and friends.

Problems with the user's input (config, model path, prompt file, reward output) end the run with exit status 2
and one line naming the problem; no traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Optional

# transformers warns at import that torchvision is missing (irrelevant here: we use no image processor)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# diffusers' warnings (e.g. "Couldn't connect to the Hub ... Will try to load from local cache") would add lines
# to a failure that the CLI reports in one
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

from fastdag.config import ConfigError, config_help, load_config  # noqa: E402

EXIT_USAGE = 2
EXIT_INTERRUPTED = 2  # as every other stop (issue 13); the shell convention would be 130


def _fail(message: str) -> int:
    from fastdag.errors import one_line

    print(f"fastdag: error: {one_line(message)}", file=sys.stderr)
    return EXIT_USAGE


def _train_help() -> str:
    rows = config_help()
    width = max(len(k) for k, *_ in rows)
    lines = ["config fields (set in the YAML file or as key=value overrides):"]
    for key, tp, default, help_text in rows:
        lines.append(f"  {key:<{width}}  {help_text}")
        lines.append(f"  {'':<{width}}    [{tp}; default {default}]")
    return "\n".join(lines)


def _train_parser(prog: str = "fastdag train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Align a diffusion model with DAG (DAG-DB / DAG-KL) or DDPO.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_train_help(),
    )
    p.add_argument("--config", help="YAML file overriding the defaults")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, applied last (e.g. train.epochs=2)")
    return p


def train_main(argv: Optional[list[str]] = None, prog: str = "fastdag train") -> int:
    args = _train_parser(prog).parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        cfg = load_config(args.config, args.overrides)  # before torch is imported: a bad config is refused in 0.3 s
        from fastdag.distributed import World, shutdown

        world = World.from_env()
    except ConfigError as e:
        return _fail(str(e))
    # Every process runs the same checks, so rank 0 alone reports (N copies of one line help nobody).
    logging.basicConfig(level=logging.INFO if world.is_main else logging.WARNING, format="%(message)s")
    from fastdag.errors import (
        ENVIRONMENT_ERRNOS, RunStopped, describe_os_error, ignore_stop_signals, install_stop_handler, keep_traceback,
        restore_handlers,
    )
    from fastdag.outputs import release_run_dirs
    from fastdag.rewards import RewardError
    from fastdag.trainer import Trainer

    trainer = None
    previous_handlers = install_stop_handler()
    try:
        trainer = Trainer(cfg)
        rows = trainer.fit()
    except (ConfigError, RewardError, RunStopped, OSError) as e:
        if isinstance(e, OSError) and e.errno not in ENVIRONMENT_ERRNOS:
            raise
        if not world.is_main:
            return EXIT_USAGE
        message = describe_os_error(e) if isinstance(e, OSError) else str(e)
        details = getattr(e, "details", None)  # a reward's own exception: its traceback is for the reward's author
        if details or isinstance(e, OSError):
            log_file = keep_traceback(getattr(trainer, "run_dir", None), e, details)
            message += f" (traceback in {log_file})" if log_file else ""
        return _fail(message)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (fastdag.errors.request_stop)
        ignore_stop_signals()
        if world.is_main:
            print(f"fastdag: {_interrupted(cfg, trainer)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        release_run_dirs()  # the run directory's lock, also when the Trainer failed before fit() took it over
        shutdown()
        restore_handlers(previous_handlers)
    if world.is_main:
        last = rows[-1]
        print(f"done: {len(rows)} epochs, final reward mean {last['reward_mean']:.4g}; outputs in {trainer.run_dir}")
    return 0


def _interrupted(cfg, trainer) -> str:
    """One line for Ctrl-C or SIGTERM: where the run stands and the command line that continues it."""
    from pathlib import Path

    from fastdag.checkpoint import latest_checkpoint
    from fastdag.errors import stop_signal

    how = "terminated (SIGTERM)" if stop_signal() == signal.SIGTERM else "interrupted"
    run_dir = getattr(trainer, "run_dir", None)
    if run_dir is None:
        return f"{how} before training started; nothing was written"
    latest = latest_checkpoint(Path(run_dir) / "checkpoints")
    if latest is None:
        return f"{how} before the first checkpoint of {run_dir}; nothing to resume, run again to start over"
    return (f"{how}; {latest} is the latest checkpoint: continue with train.resume=latest "
            f"logging.output_dir={Path(run_dir).parent} logging.run_name={Path(run_dir).name}")


def _check_output_file(path: str, key: str, suffixes: Optional[tuple[str, ...]]) -> None:
    """A file the command will write at the end: checked before an epoch is spent on it."""
    from pathlib import Path

    from fastdag.preflight import check_writable

    p = Path(path).expanduser()
    if p.is_dir() or not p.name:
        raise ConfigError(f"{key}: {path} is a directory; give a file name")
    if suffixes and p.suffix.lower() not in suffixes:
        raise ConfigError(f"{key}: {path} should end in one of {', '.join(suffixes)}")
    check_writable(p.parent, key)


def profile_main(argv: Optional[list[str]] = None) -> int:
    """``fastdag profile --config X [key=value ...]``: one epoch with per-phase timing, a table and a chart."""
    p = argparse.ArgumentParser(
        prog="fastdag profile",
        description="Time one epoch of a training config by phase (UNet, step math, VAE decode, reward, flow "
        "network, backward, optimizer, host overhead), rollout vs update. The device is synchronised at every "
        "phase boundary while profiling (x̂_0 scoring runs inline, not overlapped), so the total is a little "
        "above an unprofiled epoch's.",
    )
    p.add_argument("--config", help="YAML file overriding the defaults")
    p.add_argument("--warmup", type=int, default=0, help="unprofiled epochs first (allocator, autotuning warm-up)")
    p.add_argument("--chart", default="profile.png", help="PNG of the stacked phase breakdown")
    p.add_argument("--table", default=None, help="also write the table (Markdown) to this file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, applied last")
    args = p.parse_args(argv)
    try:
        # profiling writes no run directory and restores nothing: a run name or resume given would only be checked
        cfg = load_config(args.config, [*args.overrides, "logging.progress=false", "logging.run_name=null",
                                        "train.resume=null"])
        _check_output_file(args.chart, "--chart", (".png", ".svg", ".pdf", ".jpg", ".jpeg"))
        if args.table:
            _check_output_file(args.table, "--table", None)
    except ConfigError as e:
        return _fail(str(e))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from fastdag.errors import RunStopped
    from fastdag.profiling import plot_breakdown, profile_epoch
    from fastdag.rewards import RewardError
    from fastdag.trainer import Trainer

    try:
        trainer = Trainer(cfg)
        result = profile_epoch(trainer, warmup=args.warmup)
    except (ConfigError, RewardError, RunStopped) as e:
        return _fail(str(e))
    name = args.config or "defaults"
    title = (f"{name}: {result['trajectories']} trajectories, {result['transitions']} transitions, "
             f"{result['epoch_seconds']:.2f} s on {result['hardware']}")
    print(f"{title}\n\n{result['table']}")
    if args.table:
        from pathlib import Path

        Path(args.table).parent.mkdir(parents=True, exist_ok=True)
        Path(args.table).write_text(f"# fastdag profile: {title}\n\nCommand: `fastdag profile --config {name} "
                                    f"{' '.join(args.overrides)}`\n\n{result['table']}\n")
        print(f"table: {args.table}")
    chart = plot_breakdown({name: result["breakdown"]}, args.chart, title=f"fastdag profile: {name}")
    print(f"chart: {chart}")
    return 0


def rewards_main(argv: list[str]) -> int:
    from fastdag.rewards import METRICS, REWARDS

    for name, factory in sorted(REWARDS.items()):
        print(f"{name:<24} {(factory.__doc__ or '').strip().splitlines()[0]}")
    print("\nmetrics (eval.metric): " + ", ".join(sorted(METRICS)))
    return 0


def prompts_main(argv: list[str]) -> int:
    from fastdag.prompts import NAMED_SETS

    for name, loader in sorted(NAMED_SETS.items()):
        prompts = loader()
        print(f"{name:<16} {len(prompts):>5} prompts, e.g. {prompts[0]!r}")
    return 0


def serve_reward_main(argv: list[str]) -> int:
    from fastdag.rewards.remote import main as serve_main

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return serve_main(argv)
    except ConfigError as e:
        return _fail(str(e))


def evaluate_main(argv: list[str]) -> int:
    from fastdag.evaluate import main as evaluate

    return evaluate(argv)


def config_reference_main(argv: list[str]) -> int:
    """``fastdag config-reference [--out FILE]``: the config reference page (docs/config.md) from the code."""
    from fastdag.config import CONFIG_REFERENCE, config_reference

    p = argparse.ArgumentParser(
        prog="fastdag config-reference",
        description="Write the config reference (every field of the config tree with its type, default and doc, "
        f"as `fastdag train --help` prints them) as Markdown; the repository keeps it in {CONFIG_REFERENCE}.",
    )
    p.add_argument("--out", help=f"file to write (e.g. {CONFIG_REFERENCE}); default: standard output")
    args = p.parse_args(argv)
    text = config_reference()
    if not args.out:
        sys.stdout.write(text)
        return 0
    from pathlib import Path

    out = Path(args.out)
    try:
        _check_output_file(args.out, "--out", (".md",))
        out.write_text(text, encoding="utf-8")
    except ConfigError as e:
        return _fail(str(e))
    except OSError as e:
        from fastdag.errors import describe_os_error

        return _fail(f"--out: {describe_os_error(e)}")
    print(f"wrote {out}")
    return 0


def toy_main(argv: list[str]) -> int:
    if not argv or argv[0] != "pretrain":
        print("usage: fastdag toy pretrain --out DIR [...]  (pretrain the shapes-world model; --help for options)",
              file=sys.stderr)
        return EXIT_USAGE
    from fastdag.toy.pretrain import main as pretrain_main

    return pretrain_main(argv[1:]) or 0


def bench_main(argv: list[str]) -> int:
    from fastdag.bench.__main__ import main as bench

    return bench(argv)


COMMANDS = {
    "train": (train_main, "align a diffusion model (fastdag train --help lists every config field)"),
    "profile": (profile_main, "time one epoch of a config by phase: fastdag profile --config X [key=value ...]"),
    "rewards": (rewards_main, "list the registered rewards and metrics"),
    "prompts": (prompts_main, "list the named prompt sets"),
    "evaluate": (evaluate_main, "held-out evaluation of a run or checkpoint: fastdag evaluate RUN_DIR [key=value]"),
    "serve-reward": (serve_reward_main, "serve a reward over HTTP for reward.name=remote: fastdag serve-reward NAME"),
    "bench": (bench_main, "the benchmark suite: fastdag bench tiny|sd15|kernels|gpu-check|... (--help)"),
    "toy": (toy_main, "the embedded default's recipes: fastdag toy pretrain --out DIR"),
    "config-reference": (config_reference_main, "write the config reference page: fastdag config-reference --out "
                                                 "docs/config.md"),
}


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        return _fail(f"unknown command {argv[0]!r}; commands: {', '.join(COMMANDS)} (fastdag --help)")
    if not argv or argv[0] in ("-h", "--help"):
        usage = ["usage: fastdag COMMAND [...]", "", "commands:"]
        width = max(map(len, COMMANDS))
        usage += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
        print("\n".join(usage), file=sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else EXIT_USAGE
    from fastdag.errors import install_stop_handler, restore_handlers

    previous_handlers = install_stop_handler()  # SIGTERM stops every command as Ctrl-C does
    try:
        return COMMANDS[argv[0]][0](argv[1:])
    except KeyboardInterrupt:
        print("fastdag: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        restore_handlers(previous_handlers)


if __name__ == "__main__":
    sys.exit(main())
