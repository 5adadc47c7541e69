# inferfleet developer entry points. `make demo` and `make test` work on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
DEMO_DIR ?= .demo
# tests/ship runs real Helm through helm-sdkpy (Helm 4's Go library), which needs Python 3.12:
# a small second venv holds only it. PYTHON312 is found on PATH or through pyenv; set it if not.
VENV312 ?= .venv312
HELM_SDKPY_SPEC ?= helm-sdkpy==0.1.32
PYTHON312 ?= $(shell python3.12 -c 'import sys; print(sys.executable)' 2>/dev/null || \
	PYENV_VERSION=$$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.|$$)' | tail -n 1) \
	pyenv which python3.12 2>/dev/null)

.PHONY: all venv venv312 test lint fmt demo clean

all: test

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[worker,operator,dev]'
	touch $@

venv: $(VENV)/.installed

# The marker holds the spec it was made with, so changing HELM_SDKPY_SPEC reinstalls.
venv312:
	@grep -qxF '$(HELM_SDKPY_SPEC)' $(VENV312)/.installed 2>/dev/null || { \
	  test -n "$(PYTHON312)" || { echo "Python 3.12 not found (helm-sdkpy needs it): make PYTHON312=/path/to/python3.12" >&2; exit 1; }; \
	  set -x; \
	  test -x $(VENV312)/bin/python || $(PYTHON312) -m venv $(VENV312); \
	  $(VENV312)/bin/python -m pip install -q '$(HELM_SDKPY_SPEC)' && echo '$(HELM_SDKPY_SPEC)' > $(VENV312)/.installed; }

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check worker operator tests bench scripts

fmt: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format worker operator tests bench scripts

# pytest exits 5 when it collects nothing; that is a failure here like any other non-zero code.
test: venv venv312
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -m "not cuda" $(PYTEST_ARGS)

demo: venv
	$(PY) scripts/demo.py --dir $(DEMO_DIR)

clean:
	rm -rf $(VENV) $(VENV312) $(DEMO_DIR) .pytest_cache .ruff_cache .hypothesis
