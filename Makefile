# Headrace developer targets. `make test` is what CI runs (.ci/run).

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test demo install secrets

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

## secrets: write .env with random secrets for docker-compose (never overwrites one)
secrets:
	@test ! -e .env || { echo ".env exists; delete it first to make new secrets" >&2; exit 1; }
	@umask 077 && $(PYTHON) -c "import re, secrets, pathlib; t = pathlib.Path('.env.example').read_text(); \
	pathlib.Path('.env').write_text(re.sub(r'(?m)^([A-Z0-9_]+)=.*$$', lambda m: m.group(1) + '=' + \
	('headrace-' + secrets.token_hex(4) if m.group(1) == 'S3_ACCESS_KEY' else secrets.token_urlsafe(24)), t))"
	@chmod 600 .env
	@echo "wrote .env (mode 600)"
