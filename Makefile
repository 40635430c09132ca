# LoRA Fleet. The two commands: `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU-only machines take the CPU wheel (this machine kind keeps it on disk); on a GPU machine
# run `make TORCH=torch` to get the normal (CUDA) build.
TORCH ?= torch==2.13.0
export RAY_USAGE_STATS_ENABLED ?= 0
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1

.PHONY: install chromium demo test test-fast bench bench-quick lint clean

$(BIN)/.installed: pyproject.toml sdk/pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e '.[test,bench]' -e 'sdk[cli]'
	touch $@

install: $(BIN)/.installed chromium

# tests/browser drive Debian's chromium through Playwright (whose own browser download cannot
# work here); installed when missing (as root, as on this machine kind and in CI).
chromium:
	@command -v chromium >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

demo: install
	$(BIN)/lorafleet demo

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider --timeout=900 $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench-quick: install
	$(BIN)/python bench/api_load.py --quick
	$(BIN)/python bench/train_throughput.py --quick
	$(BIN)/python bench/serve_throughput.py --quick
	$(BIN)/python bench/scheduler_scale.py --quick

bench: install
	$(BIN)/python bench/api_load.py --json bench/results/api_load.json
	$(BIN)/python bench/train_throughput.py --json bench/results/train_throughput.json
	$(BIN)/python bench/serve_throughput.py --json bench/results/serve_throughput.json
	$(BIN)/python bench/scheduler_scale.py --json bench/results/scheduler_scale.json

clean:
	rm -rf .lorafleet .pytest_cache
