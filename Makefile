# `make run` and `make test` set everything up on a fresh machine (a venv with
# pinned dependencies) and then start the dashboard / run the tests.
#
# TORCH_SPEC picks the PyTorch build installed before everything else. The
# default is the CPU wheel this project is developed and tested on; GPU users
# run e.g. `make run TORCH_SPEC=torch` to get PyPI's CUDA build.
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv run test lint bench wheel clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

venv: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/attnscope demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) bench/core.py

# The product: one wheel holding attnscope (page included) and transformer_core.
wheel: $(STAMP)
	$(PY) -m pip wheel --no-deps --wheel-dir dist .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build dist
