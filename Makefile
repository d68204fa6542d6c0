# The two commands a newcomer runs: `make demo` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test unit lint demo bench clean

setup:
	bash scripts/setup.sh

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

unit: setup
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test: setup lint
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(PY) scripts/demo.py

# bench: the registration, routing and fault-matrix benchmarks (bench/README.md), about 20
# minutes; each writes its raw results to bench/results/, then the tables of
# docs/benchmarks.md are regenerated from them; a missed target (exit 1) does not stop the next
# benchmark. The DNS, deploy, accept-queue, fleet and footprint benchmarks, and faults.py's
# dockerd restarts (--include-dockerd), are run apart (bench/README.md).
bench: export DISCOVERY_BENCH := 1
bench: setup
	-$(PY) bench/registration.py
	-$(PY) bench/routing.py
	-$(PY) bench/faults.py
	$(PY) scripts/gen_benchmarks.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
