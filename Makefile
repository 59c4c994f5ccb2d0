# Every target creates the virtual environment on first use (and again when pyproject.toml changes).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
DATA   ?= data/synth

.PHONY: venv test run bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

venv: $(STAMP)

## The main job on the embedded default: procedural CIFAR-100 in the real on-disk format, then checked.
run: $(STAMP)
	$(PY) -m cifarray.data synth $(DATA)
	$(PY) -m cifarray.data check $(DATA) --no-verify

## The whole test suite, slow tests included (CI runs exactly this).
test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m cifarray.bench augment

clean:
	rm -rf $(VENV) data .pytest_cache
