# Two commands do all set-up (see README.md):
#   make run    creates .venv, installs everything, trains dsod_tiny on the embedded dataset
#   make test   creates .venv, installs everything, runs the whole test suite
# Both are idempotent: a second run skips the install (a stamp file records it).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
CONSTRAINTS := requirements/constraints.txt
STAMP := $(VENV)/.installed
TORCH_PINS := $(shell grep -E '^(torch|torchvision)==' $(CONSTRAINTS))
# Compile CUDA kernels even without a GPU to detect (see toolkit/ops).
export CUDA_HOME ?= /usr/local/cuda
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0

.PHONY: setup run test bench clean-venv

setup: $(STAMP)

# torch first (its CUDA build also runs on the CPU), then the rest against the
# constraints file so that no dependency can pull in another torch.
$(STAMP): $(CONSTRAINTS) setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH_PINS)
	$(PIP) install -q -c $(CONSTRAINTS) -e '.[all]'
	touch $@

run: setup
	$(PY) -m toolkit.data.shapes --root data/shapes
	$(PY) -m toolkit.train --dataset shapes --model dsod_tiny --amp --cache-images --workers 0 --out runs/main

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/bench_data_pipeline.py
	$(PY) bench/bench_eval.py
	$(PY) bench/bench_train.py

clean-venv:
	rm -rf $(VENV)
