# `make demo` and `make test` bootstrap .venv on first use (CPU torch where there is no GPU).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Machines without an NVIDIA GPU get this CPU build of torch (it lies on disk on the team's CPU
# machines); elsewhere pass e.g. TORCH_CPU="torch --index-url https://download.pytorch.org/whl/cpu".
TORCH_CPU ?= torch==2.13.0
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
PYTEST_ARGS ?=

.PHONY: demo test lint bench ui clean-venv

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
ifeq ($(HAS_GPU),yes)
	$(BIN)/pip install torch
else
	$(BIN)/pip install $(TORCH_CPU)
endif
	$(BIN)/pip install -c requirements.lock -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/collapse run configs/demo.yaml

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint Dockerfile

bench: $(STAMP)
	$(BIN)/python bench/throughput.py
	$(BIN)/python bench/sampler.py
	$(BIN)/python bench/metrics.py --words 2000000
	$(BIN)/python bench/downstream.py

ui: $(STAMP)
	$(BIN)/collapse ui

clean-venv:
	rm -rf $(VENV)
