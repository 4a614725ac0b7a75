# Two commands do all set-up on a fresh machine: `make demo` and `make test` (`make help` lists
# the targets). Both create .venv (with a Python >= 3.12, found by tools/find-python) when it is
# missing.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8

# Tests, notebooks and the demo run on simulated CPU devices unless JAX_PLATFORMS says otherwise;
# `make bench` runs where JAX finds accelerators (GPUs once the CUDA extra is installed).
demo test test-slow test-all notebooks: export JAX_PLATFORMS ?= cpu

.PHONY: help venv demo test test-slow test-all lint format proto notebooks bench clean

venv: $(STAMP) ## create .venv and install the project (editable, with the dev tools)

$(STAMP): pyproject.toml
	@test -x $(PY) || $$(tools/find-python) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

help: ## list the targets
	@awk 'BEGIN {FS = ":[^#]*## "} /^[a-z-]+:.*## / {printf "  make %-10s %s\n", $$1, $$2}' \
		$(MAKEFILE_LIST)

demo: $(STAMP) ## fail devices under live traffic on 8 simulated CPU devices
	$(VENV)/bin/elastic-moe demo

test: $(STAMP) ## ruff, then the default test suite (what CI runs)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q

test-slow: $(STAMP) ## the tests marked slow
	$(PY) -m pytest -q -m slow

test-all: $(STAMP) ## every test, slow ones included
	$(PY) -m pytest -q -m ''

lint: $(STAMP) ## ruff check and ruff format --check
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP) ## fix what ruff can, format the code
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

proto: $(STAMP) ## regenerate the gRPC stubs from serve/proto/elastic_moe.proto
	$(PY) -m serve.proto.generate

notebooks: $(STAMP) ## execute the notebooks (tests/test_notebooks.py)
	$(PY) -m pytest -q -m '' tests/test_notebooks.py

bench: $(STAMP) ## every benchmark (elastic-moe bench), on the accelerators JAX finds
	$(VENV)/bin/elastic-moe bench

clean: ## remove .venv and the caches
	rm -rf $(VENV) .pytest_cache .ruff_cache
