# The two commands of the README: `make demo` (the main job) and `make test` (the suite).
# Each creates or reuses .venv and installs what it needs. torch==2.13.0 is installed first
# when missing: plain `torch` would pull GBs of CUDA wheels on a CPU machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.grpo_ar_installed

.PHONY: demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,examples]'
	touch $(STAMP)

demo: $(STAMP)
	@echo "grpo_ar: the end-to-end demo lands with the text slice; running the core self-check"
	$(BIN)/python -m pytest -q tests/core

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
