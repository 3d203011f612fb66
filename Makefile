# Two entry points for a fresh machine (see README): `make demo` and `make test` (`make sim` serves the simulator).
# Both create .venv and install the project into it when pyproject.toml is newer than the last install.

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo sim test lint unit bench system-deps

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/flywatch demo

sim: $(STAMP)
	$(VENV)/bin/flywatch sim

lint: $(STAMP)
	$(VENV)/bin/ruff check daemon tests bench
	$(VENV)/bin/ruff format --check daemon tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

system-deps:
	bash scripts/system-deps.sh

unit: $(STAMP) system-deps
	$(VENV)/bin/pytest

test: lint unit

bench: $(STAMP) system-deps
	$(PY) -m bench.run
