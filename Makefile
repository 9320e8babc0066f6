# `make test` and `make evolve` set up .venv themselves (once; again when a pin changes).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install lint test test-all evolve prepare clean

$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt -c constraints.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q -m "not slow"

test-all: install
	$(PY) -m pytest -q

prepare: install
	$(PY) scripts/prepare_data.py

evolve: install
	$(PY) scripts/evolve.py

clean:
	rm -rf $(VENV) .cache
