# `make test` and `make evolve` set up .venv themselves (once; again when a pin changes).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install lint test test-all evolve demo prepare clean

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

# A first run that shows something: 5 children on the quick profile, one seed, the offline mutator (no
# API key, no cost), then the run's report. Run again, it resumes the demo (or just reports a finished one).
DEMO := openevolve_output/demo
demo: install
	$(PY) scripts/evolve.py --profile quick --iterations 5 --seeds 42 --llm offline --output $(DEMO) \
		$(if $(wildcard $(DEMO)/run.json),--resume)
	$(PY) scripts/inspect_run.py $(DEMO) --html
	@echo "demo: the run is in $(DEMO)/, its report in $(DEMO)/report/report.html"

clean:
	rm -rf $(VENV) .cache
