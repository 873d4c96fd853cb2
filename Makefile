# One entry point for people and CI. `make demo` sets up and runs the main job; `make test` runs
# every check CI runs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint typecheck contracts unit bench clean

$(BIN)/tidal: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

setup: $(BIN)/tidal

demo: setup
	$(BIN)/tidal simulate --quick
	$(BIN)/tidal plan examples/plan-two-cliques.yaml

lint: setup
	$(BIN)/ruff check tidal tests bench
	$(BIN)/ruff format --check tidal tests bench

typecheck: setup
	$(BIN)/mypy

contracts: setup
	$(BIN)/lint-imports

unit: setup
	$(BIN)/pytest

test: lint typecheck contracts unit

bench: setup
	$(BIN)/python bench/placement_bench.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis *.egg-info
