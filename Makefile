# Two entry points for a fresh machine: `make demo` (set up, then run the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU-only machines: torch 2.13.0 first, from its own wheel, so nothing pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0
# Every package at the exact version tested (see .ci/deps.py); setup.py keeps the ranges for library users.
LOCK ?= requirements.lock

.PHONY: setup demo test test-slow check-lock lock test-latest

$(BIN)/fastdag: setup.py $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c $(LOCK) pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -c $(LOCK) -e ".[test]"
	touch $@

setup: $(BIN)/fastdag

check-lock: setup
	$(BIN)/python .ci/deps.py check $(LOCK)

demo: setup
	$(BIN)/fastdag train --config configs/shapes_aesthetic.yaml

test: check-lock
	$(BIN)/python -m pytest -q -n 2 tests

test-slow: setup
	$(BIN)/python -m pytest -q -m slow tests

# The next release of a dependency, caught before users meet it: a venv of the newest versions setup.py's ranges
# allow (.venv-latest), what changed against the lock, and the suite on them.
test-latest:
	$(PYTHON) .ci/deps.py latest

# Refresh the lock: a new venv of the newest versions in range, frozen into $(LOCK). Then `make test` on it, commit.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip
	.venv-lock/bin/python -m pip install -q "$(TORCH)"
	.venv-lock/bin/python -m pip install -q ".[test]"
	.venv-lock/bin/python .ci/deps.py freeze $(LOCK)
	rm -rf .venv-lock build
