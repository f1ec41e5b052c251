# The two commands the README promises: `make run` (gateway + two real CPU vLLM servers)
# and `make test` (lint, types, the whole test suite including the real-vLLM tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test lint typecheck pytest bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

run: $(BIN)/.installed
	$(BIN)/dual-vllm local run

test: $(BIN)/.installed lint typecheck
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
