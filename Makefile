# Two entry points for a fresh machine: `make demo` (set up, then run the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU-only machines: torch 2.13.0 first, from its own wheel, so nothing pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: setup demo test test-slow

$(BIN)/fastdag: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

setup: $(BIN)/fastdag

demo: setup
	$(BIN)/fastdag train --config configs/shapes_aesthetic.yaml

test: setup
	$(BIN)/python -m pytest -q -n 2 tests

test-slow: setup
	$(BIN)/python -m pytest -q -m slow tests
