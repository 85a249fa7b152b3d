"""Ending a run with one line: what the CLI prints for failures that are the input's or the environment's, not
fastdag's (exit status 2), with any traceback kept in the run directory's ``error.log`` rather than on the
terminal."""
from __future__ import annotations

import errno
import re
import reprlib
import signal
import traceback
from pathlib import Path
from typing import Any, Callable, Optional, Union

# OSErrors that describe the machine (a full disk, a read-only or vanished mount), not a bug.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.ENOENT,
                      errno.ENOTDIR, errno.EISDIR, errno.EFBIG}
ERROR_LOG = "error.log"
# A quoted value (a config value, a file name) is cut to this many characters, and a whole line to MAX_LINE: a
# hostile or mistaken input (a YAML alias bomb, a megabyte-long string) must not become a gigabyte-long message.
MAX_QUOTED = 200
MAX_LINE = 2000


class RunStopped(RuntimeError):
    """The run cannot go on; the message says why in one line (exit status 2)."""


def one_line(message: str) -> str:
    """Messages quote user input (file names, values): never let one spill onto a second line, or run past
    MAX_LINE characters."""
    line = " | ".join(part.strip() for part in str(message)[: 4 * MAX_LINE].splitlines() if part.strip())
    return clip(line, MAX_LINE) or "(no message)"


def clip(text: str, limit: int = MAX_QUOTED) -> str:
    """``text`` cut to ``limit`` characters, the cut marked with "…"."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


_short = reprlib.Repr()
_short.maxlevel, _short.maxdict, _short.maxlist, _short.maxtuple, _short.maxset = 3, 6, 6, 6, 6
_short.maxstring, _short.maxother = MAX_QUOTED, MAX_QUOTED
_short.fillvalue = "…"  # Python >= 3.11 (3.10 keeps "...")


def short_repr(value: Any, limit: int = MAX_QUOTED) -> str:
    """``repr(value)`` for an error message: nested containers elided (reprlib never walks all of a large or
    alias-shared structure) and the result clipped to ``limit`` characters."""
    return clip(_short.repr(value), limit)


def without_trace_hints(message: str) -> str:
    """Drop library sentences that point at a stack trace the one-line report does not show."""
    kept = [s for s in re.split(r"(?<=[.!])\s+", message) if not re.search(r"stack ?trace|traceback", s, re.I)]
    return " ".join(kept) or message


def describe_os_error(e: OSError) -> str:
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{e.strerror or e}"


def keep_traceback(run_dir: Optional[Path], error: BaseException, details: Optional[str] = None) -> Optional[Path]:
    """Append ``details`` (or ``error``'s traceback) to the run directory's error.log; its path, or None when
    there is no run directory yet or it cannot be written."""
    if run_dir is None or not Path(run_dir).is_dir():
        return None
    text = details or "".join(traceback.format_exception(type(error), error, error.__traceback__))
    path = Path(run_dir) / ERROR_LOG
    try:
        with path.open("a", encoding="utf-8") as fh:
            fh.write(text if text.endswith("\n") else text + "\n")
    except OSError:
        return None
    return path


# Ctrl-C and SIGTERM. SIGTERM is how `timeout`, Slurm, Kubernetes and torchrun (to the ranks that survive a
# failed one) stop a job; by default it kills the process silently (exit 143), so it is treated as Ctrl-C: the run
# stops between two Python instructions, the last complete checkpoint stays the latest (a save is published by
# a rename), and the CLI prints where to resume.
# Python raises KeyboardInterrupt wherever the main thread is when the signal arrives; if that is inside a
# __del__ or a garbage-collector callback, Python prints "Exception ignored in ..." and carries on, and the run
# trains on (seen in tests as a rare hang). So the CLI's handler also records the request, and the trainer checks
# it between phases: a lost KeyboardInterrupt is raised again within one phase.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
Handler = Union[Callable[[int, Any], Any], int, None]
_stop_requested: Optional[int] = None  # the signal that asked the run to stop


def request_stop(signum: int = signal.SIGINT, frame: object = None) -> None:
    """SIGINT/SIGTERM handler: remember the request, then raise KeyboardInterrupt as Python's SIGINT handler does."""
    global _stop_requested
    _stop_requested = signum
    raise KeyboardInterrupt


def install_stop_handler() -> dict[int, Handler]:
    """Clears any earlier request and makes `request_stop` the handler of SIGINT and SIGTERM; returns the previous
    handlers (for `restore_handlers`)."""
    global _stop_requested
    _stop_requested = None
    return {sig: signal.signal(sig, request_stop) for sig in STOP_SIGNALS}


def restore_handlers(previous: dict[int, Handler]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def ignore_stop_signals() -> None:
    """While a stopping run writes its last line and leaves: a second Ctrl-C (or SIGTERM, which launchers may send
    again) would otherwise interrupt the exit itself with a traceback. SIGKILL still ends it."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def stop_signal() -> Optional[int]:
    """The signal that stopped the run (None: no stop was requested)."""
    return _stop_requested


def raise_if_stop_requested() -> None:
    """KeyboardInterrupt if a stop was requested (`request_stop`) and its first KeyboardInterrupt was swallowed."""
    if _stop_requested is not None:
        raise KeyboardInterrupt

