# Quick start: `make demo` and `make test` (each creates .venv if missing).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DATA ?=
FORCE ?=
PYTEST_ARGS ?=

.PHONY: demo serve test lint venv clean-demo

venv: $(STAMP)

$(STAMP): setup.py requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m dinov2.run.demo --output-dir demo_output $(if $(DATA),--data $(DATA)) $(if $(FORCE),--force)

# The web app on the classifier `make demo` trains (dinov2/run/demo_classifier.py), its training split as the
# reference set; http://127.0.0.1:8000/ until Ctrl+C.
serve: $(STAMP)
	@test -f demo_output/classifier/run/best.pth || { echo "no demo classifier yet: run make demo first"; exit 2; }
	$(VENV)/bin/dinov2-serve --model demo_output/classifier/run/best.pth --reference demo_output/classifier/split/TRN

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean-demo:
	rm -rf demo_output
