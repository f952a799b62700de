# One-command set-up: every target builds .venv first (torch pinned to the CPU wheel).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv install demo test lint bench reference-model clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

venv install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m privdiff.demo

# The library and both plug-ins run on Python 3.10 (A1111's documented Python): vermin fails on newer names.
PY310_CHECK := $(BIN)/vermin --target=3.10- --violations --no-tips --eval-annotations -q \
	privdiff nodes extension __init__.py install.py scripts

test: $(STAMP)
	$(BIN)/ruff check .
	$(PY310_CHECK)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(PY310_CHECK)

# Retrain the shipped small reference model (privdiff/models/small_weights) from the public procedural data.
reference-model: $(STAMP)
	$(BIN)/python -m privdiff.reference.train --threads 2

bench: $(STAMP)
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) privdiff-demo
