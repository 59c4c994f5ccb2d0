# Every target creates the virtual environment on first use (and again when pyproject.toml changes).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: venv test run bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

venv: $(STAMP)

RUN    ?= runs/quickstart

## The main job on the embedded default: a real Ray Tune + Optuna sweep of small DenseNets on procedural
## CIFAR-format data, then its confirmation over seeds (sweeps/quickstart.toml; 4-8 minutes on 2 CPU cores). Rerun: resumes, or reports.
run: $(STAMP)
	$(PY) -m cifarray.tune --sweep sweeps/quickstart.toml --synthetic --out $(RUN) \
		$(if $(wildcard $(RUN)/tune),--resume,)
	$(PY) -m cifarray.data check $(RUN)/data --no-verify

## The whole test suite, slow tests included (CI runs exactly this), on two processes (pytest-xdist; the
## grouping is tests/conftest.py's): the Slurm tests wait on Slurm about half of their time.
TEST_PROCS ?= 2
test: $(STAMP)
	$(PY) -m pytest -n $(TEST_PROCS)

bench: $(STAMP)
	$(PY) -m cifarray.bench augment
	$(PY) -m cifarray.bench train
	$(PY) -m cifarray.bench sweep

clean:
	rm -rf $(VENV) runs .pytest_cache
