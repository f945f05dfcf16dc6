# lightlong: `make run` and `make test` work on a fresh machine with nothing but Python.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch is pinned; override for a GPU machine, e.g. TORCH_SPEC="torch==2.13.0 --index-url URL".
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-all test-triton-interpret bench lint format clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/lightlong demo

test: $(STAMP)
	$(PY) -m pytest -m "not slow" -q

test-all: $(STAMP)
	$(PY) -m pytest -q
	$(MAKE) test-triton-interpret

# The Triton kernels on the CPU interpreter (small shapes, ~3 min); on a GPU `make test` runs them.
test-triton-interpret: $(STAMP)
	$(PY) -m pip install -q -e ".[triton]"
	TRITON_INTERPRET=1 $(PY) -m pytest -m triton -q tests/test_lightning_triton.py tests/test_lightning_ops.py

# Replaces the committed results in benchmarks/results with this machine's (asked for: a
# bench alone refuses to overwrite them without --overwrite).
bench: $(STAMP)
	$(VENV)/bin/lightlong bench attention --overwrite
	$(VENV)/bin/lightlong bench model --overwrite
	$(VENV)/bin/lightlong bench generate --overwrite
	$(VENV)/bin/lightlong bench train --overwrite
	$(VENV)/bin/lightlong bench serve --overwrite
	$(VENV)/bin/lightlong bench parallel --overwrite

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
