# Two entry points for a fresh machine (see README): `make sim` and `make test`.
# Both create .venv and install the project into it when pyproject.toml is newer than the last install.

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: sim test lint unit bench

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

sim: $(STAMP)
	$(VENV)/bin/flywatch sim

lint: $(STAMP)
	$(VENV)/bin/ruff check daemon tests
	$(VENV)/bin/ruff format --check daemon tests
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

unit: $(STAMP)
	$(VENV)/bin/pytest

test: lint unit

bench: $(STAMP)
	$(PY) -m bench.run
