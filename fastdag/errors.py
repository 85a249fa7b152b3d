"""Ending a run with one line: what the CLI prints for failures that are the input's or the environment's, not
fastdag's (exit status 2), with any traceback kept in the run directory's ``error.log`` rather than on the
terminal."""
from __future__ import annotations

import errno
import re
import signal
import traceback
from pathlib import Path
from typing import Optional

# OSErrors that describe the machine (a full disk, a read-only or vanished mount), not a bug.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.ENOENT,
                      errno.ENOTDIR, errno.EISDIR, errno.EFBIG}
ERROR_LOG = "error.log"


class RunStopped(RuntimeError):
    """The run cannot go on; the message says why in one line (exit status 2)."""


def one_line(message: str) -> str:
    """Messages quote user input (file names, values): never let one spill onto a second line."""
    return " | ".join(part.strip() for part in str(message).splitlines() if part.strip()) or "(no message)"


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


# Ctrl-C. Python raises KeyboardInterrupt wherever the main thread is when SIGINT arrives; if that is inside a
# __del__ or a garbage-collector callback, Python prints "Exception ignored in ..." and carries on, and the run
# trains on (seen in tests as a rare hang). So the CLI's handler also records the request, and the trainer checks
# it between phases: a lost KeyboardInterrupt is raised again within one phase.
_stop_requested = False


def request_stop(signum: int = 0, frame: object = None) -> None:
    """SIGINT handler: remember the request, then raise KeyboardInterrupt as Python's default handler does."""
    global _stop_requested
    _stop_requested = True
    raise KeyboardInterrupt


def install_stop_handler():
    """Clears any earlier request and makes `request_stop` the SIGINT handler; returns the previous handler."""
    global _stop_requested
    _stop_requested = False
    return signal.signal(signal.SIGINT, request_stop)


def raise_if_stop_requested() -> None:
    """KeyboardInterrupt if Ctrl-C was pressed (`request_stop`) and its first KeyboardInterrupt was swallowed."""
    if _stop_requested:
        raise KeyboardInterrupt

