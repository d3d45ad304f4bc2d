# Two entry points: `make demo` runs the main job, `make test` runs the test suite.
# Both create .venv when missing and install the package (editable) with its dev extras.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow test-slurm slurm-up slurm-down lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1 || $(BIN)/pip install --quiet torch torchvision
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/agnostic-sam compare --config configs/demo_digits.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# A one-node SLURM cluster on this machine (root, Debian; no systemd): installs slurm-wlm,
# munge, slurmdbd and MariaDB when missing, starts them, waits until a job runs. Idempotent.
slurm-up:
	scripts/slurm-up.sh

slurm-down:
	scripts/slurm-down.sh

test-slurm: $(STAMP)
	$(BIN)/python -m pytest -q -m slurm

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python benchmarks/step_time.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
