# Quick start: `make demo` and `make test` (each creates .venv if missing).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DATA ?=
FORCE ?=
PYTEST_ARGS ?=

.PHONY: demo test lint venv clean-demo

venv: $(STAMP)

$(STAMP): setup.py requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m dinov2.run.demo --output-dir demo_output $(if $(DATA),--data $(DATA)) $(if $(FORCE),--force)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean-demo:
	rm -rf demo_output
