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

## The main job on the embedded default: a DenseNet trained by Ray Train on procedural CIFAR-format data
## (a small model and 300 steps, so that it finishes in a few minutes on 2 CPU cores). Rerun: resumes/no-op.
run: $(STAMP)
	$(PY) -m cifarray.train densenet --synthetic --synthetic-train-per-class 100 --synthetic-test-per-class 20 \
		--val-size 1000 --growth-rate 6 --blocks 3,3,3 --init-channels 16 --batch-size 128 --steps 300 \
		--augment basic --eval-every 100 --checkpoint-every 100 --out $(RUN)
	$(PY) -m cifarray.data check $(RUN)/data --no-verify

## The whole test suite, slow tests included (CI runs exactly this).
test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m cifarray.bench augment
	$(PY) -m cifarray.bench train

clean:
	rm -rf $(VENV) runs .pytest_cache
