# inferfleet developer entry points. `make demo` and `make test` work on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
DEMO_DIR ?= .demo

.PHONY: all venv test lint fmt demo clean

all: test

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[worker,operator,dev]'
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check worker operator tests bench scripts

fmt: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format worker operator tests bench scripts

# pytest exits 5 when it collects nothing; that is a failure here like any other non-zero code.
test: venv
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -m "not cuda" $(PYTEST_ARGS)

demo: venv
	$(PY) scripts/demo.py --dir $(DEMO_DIR)

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .ruff_cache .hypothesis
