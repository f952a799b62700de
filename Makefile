# One-command set-up: every target builds .venv first (torch pinned to the CPU wheel).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv install demo test lint bench reference-model clean

# pip compiles every installed module on one core; compileall does the same on all cores (about half the
# set-up time of a fresh clone). A module it cannot compile still imports, from source.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-compile torch==2.13.0
	$(BIN)/pip install --quiet --no-compile -c constraints.txt -e ".[dev]"
	$(BIN)/python -m compileall -q -j 0 $$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))') > /dev/null || true
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

# Retrain the shipped small reference model (privdiff/models/small_weights) and the public spectral prior
# (privdiff/models/small_spectral_prior.safetensors) from the public procedural data.
reference-model: $(STAMP)
	$(BIN)/python -m privdiff.reference.train --threads 2
	$(BIN)/python -m privdiff.demo.spectral --public-prior

bench: $(STAMP)
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) privdiff-demo
