# Headrace developer targets. `make test` is what CI runs (.ci/run).

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test demo install

$(PY):
	$(PYTHON) -m venv $(VENV)

install: $(PY)
	$(PY) -m pip install -c constraints.txt -e '.[dev]'

## test: lint, type check, then every test, integration included (starts real local
## services on free ports)
test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) -m pytest -q

## demo: the end-to-end demo on a throwaway local stack
demo: install
	$(VENV)/bin/headrace demo
