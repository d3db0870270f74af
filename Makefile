# Two commands set everything up on a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV ?= .venv
# The versions the suite last passed with; `make test VENV=.venv-latest CONSTRAINTS=` tests the newest releases.
CONSTRAINTS ?= constraints.txt
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
# Tests and the demo never touch the model or dataset hubs.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: venv test lint demo

venv: $(INSTALLED)

# This checkout as an editable package, with evaluate.py's metrics and the test tools.
$(INSTALLED): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(if $(CONSTRAINTS),--constraint $(CONSTRAINTS)) --editable ".[eval,dev]"
	touch $(INSTALLED)

test: $(INSTALLED)
	$(PY) -m pytest -n 2 --dist loadfile --durations=15 tests

demo: $(INSTALLED)
	$(PY) demo.py --output_dir demo_output

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
