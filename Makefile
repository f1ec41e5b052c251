# The two commands the README promises: `make run` (gateway + two real CPU vLLM servers)
# and `make test` (lint, types, the whole test suite including the real-vLLM tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test lint typecheck pytest bench clean system-deps

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

run: $(BIN)/.installed
	$(BIN)/dual-vllm local run

# The real-Prometheus test (tests/test_prometheus_real.py) needs Debian's prometheus/promtool.
system-deps:
	@command -v prometheus >/dev/null || { [ "$$(id -u)" = 0 ] || { echo "system-deps: install Debian's prometheus package (needs root): apt-get install prometheus" >&2; exit 1; }; apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus; }

test: $(BIN)/.installed lint typecheck system-deps
	$(BIN)/dual-vllm local setup
	$(BIN)/pytest

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(BIN)/.installed
	$(BIN)/mypy

bench: $(BIN)/.installed
	$(BIN)/python bench/sampling.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
