# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv (with a Python >= 3.12, found by tools/find-python) when it is missing.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8
export JAX_PLATFORMS ?= cpu

.PHONY: venv demo test test-slow test-all lint format proto notebooks bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $$(tools/find-python) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/elastic-moe demo

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

test-all: $(STAMP)
	$(PY) -m pytest -q -m ''

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

proto: $(STAMP)
	$(PY) -m serve.proto.generate

notebooks: $(STAMP)
	$(PY) -m pytest -q tests/test_notebooks.py

bench: $(STAMP)
	$(VENV)/bin/elastic-moe bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
