"""The locked dependency set: check an environment against a lock, write a lock, and the newest-versions drift check.

    python .ci/deps.py check requirements.lock     # exit 1 with one line when the installed versions differ
    python .ci/deps.py freeze requirements.lock    # write the lock from the running environment (make lock)
    python .ci/deps.py diff requirements.lock      # what the running environment changed against the lock
    python3 .ci/deps.py latest                     # make test-latest: a venv of the newest versions, diff, suite

A lock is ``pip freeze --all`` output (exact ``name==version`` lines, ``#`` comments), used as pip constraints by
``make setup``; ``setup.py`` keeps the ranges for library users, and every locked version must lie inside them.
The standard library only: ``latest`` runs with the machine's python, before any venv exists.
"""
from __future__ import annotations

import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Never locked: the project itself (installed editable from the checkout), and the build tools a venv is created
# with (their versions come with the Python, 3.12 has none).
SELF = {"fastdag", "setuptools", "wheel"}
LATEST_VENV = REPO / ".venv-latest"
TORCH = "torch==2.13.0"  # as the Makefile: the CPU wheel first, so nothing pulls a CUDA build


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def public(version: str) -> str:
    """2.13.0+cpu -> 2.13.0: the local label names the build (CPU or CUDA), not the release the lock fixes."""
    return version.split("+", 1)[0]


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        if not m:
            raise SystemExit(f"deps: {path}:{n}: not a name==version line: {raw!r}")
        pins[canonical(m.group(1))] = m.group(2)
    return pins


def installed() -> dict[str, str]:
    found = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and canonical(name) not in SELF:
            found[canonical(name)] = public(dist.version)
    return found


def differences(lock: dict[str, str], have: dict[str, str]) -> list[str]:
    """One short phrase per package whose installed version is not the locked one (or is not locked at all)."""
    out = []
    for name in sorted(set(lock) | set(have)):
        want, got = lock.get(name), have.get(name)
        if want == got:
            continue
        if got is None:
            out.append(f"{name} missing (lock {want})")
        elif want is None:
            out.append(f"{name} {got} not in the lock")
        else:
            out.append(f"{name} {got} (lock {want})")
    return out


def check(lock_path: Path) -> int:
    diff = differences(read_lock(lock_path), installed())
    if diff:
        print(f"deps: the installed packages differ from {lock_path.name}: {'; '.join(diff)} "
              f"(rebuild the venv: rm -rf .venv && make setup; or refresh the lock: make lock)", file=sys.stderr)
        return 1
    return 0


def freeze(lock_path: Path) -> int:
    have = installed()
    header = [
        f"# Exact versions of every package `make setup` installs (pip constraints), written by `make lock` on",
        f"# {time.strftime('%Y-%m-%d')} with Python {sys.version.split()[0]} from the ranges in setup.py (extras: test).",
        "# Refresh: make lock (a new venv with the newest versions the ranges allow), run make test, commit.",
    ]
    lock_path.write_text("\n".join(header + [f"{name}=={v}" for name, v in sorted(have.items())]) + "\n")
    print(f"deps: wrote {len(have)} pins to {lock_path}")
    return 0


def diff(lock_path: Path) -> int:
    changes = differences(read_lock(lock_path), installed())
    print(f"deps: {len(changes)} packages differ from {lock_path.name}" + (":" if changes else ""))
    for line in changes:
        print(f"  {line}")
    return 0


def latest() -> int:
    """A new venv with the newest versions setup.py's ranges allow, its difference to the lock, and the suite."""
    py = LATEST_VENV / "bin" / "python"

    def run(*cmd: str) -> int:
        print("+", " ".join(cmd), flush=True)
        return subprocess.run(cmd, cwd=REPO).returncode

    if LATEST_VENV.exists():
        subprocess.run(["rm", "-rf", str(LATEST_VENV)], check=True)
    steps = [[sys.executable, "-m", "venv", str(LATEST_VENV)],
             [str(py), "-m", "pip", "install", "-q", "--upgrade", "pip"],
             [str(py), "-m", "pip", "install", "-q", TORCH],
             [str(py), "-m", "pip", "install", "-q", "--upgrade", "--upgrade-strategy", "eager", "-e", ".[test]"]]
    for cmd in steps:
        if run(*cmd) != 0:
            print("test-latest: the newest versions do not install (above); the lock still does", flush=True)
            return 1
    subprocess.run([str(py), str(Path(__file__).resolve()), "diff", str(REPO / "requirements.lock")], cwd=REPO)
    code = run(str(py), "-m", "pytest", "-q", "-n", "2", "-rfE", "-p", "no:cacheprovider", "tests")
    verdict = "passed" if code == 0 else f"failed (pytest exit {code}; the failures are listed above)"
    print(f"test-latest: the suite on the newest versions {verdict}; the packages that changed are listed above")
    return 0 if code == 0 else 1


def main(argv: list[str]) -> int:
    if argv[:1] == ["latest"]:
        return latest()
    if len(argv) != 2 or argv[0] not in ("check", "freeze", "diff"):
        print(__doc__, file=sys.stderr)
        return 2
    command, path = argv[0], Path(argv[1])
    if command != "freeze" and not path.is_file():
        print(f"deps: {path} does not exist (write it with make lock)", file=sys.stderr)
        return 2
    return {"check": check, "freeze": freeze, "diff": diff}[command](path)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
