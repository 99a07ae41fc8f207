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
# The compiled ops (toolkit/ops/csrc) are built by the install, against the torch
# installed first: hence --no-build-isolation (an isolated build would fetch
# another torch) and setuptools + ninja installed beforehand.  CUDA kernels are
# built when a GPU is visible, or with FORCE_CUDA=1 (.ci/run sets it, with
# TORCH_CUDA_ARCH_LIST, so that CI compiles them on machines without a GPU).
export CUDA_HOME ?= $(wildcard /usr/local/cuda)
OPS_SOURCES := setup.py $(wildcard toolkit/ops/csrc/*.h toolkit/ops/csrc/*.cpp toolkit/ops/csrc/*/*.cpp toolkit/ops/csrc/*/*.cu)
BUILD_PINS := $(shell grep -E '^(setuptools|ninja)==' $(CONSTRAINTS))

.PHONY: setup run test browser bench clean-venv

setup: $(STAMP)

# torch first (its CUDA build also runs on the CPU), then the rest against the
# constraints file so that no dependency can pull in another torch.
$(STAMP): $(CONSTRAINTS) setup.cfg pyproject.toml $(OPS_SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH_PINS)
	$(PIP) install -q $(BUILD_PINS)
	$(PIP) install -q --no-build-isolation -c $(CONSTRAINTS) -e '.[all]'
	$(PY) -c "import toolkit.ops as o; print('toolkit.ops kernels:', 'CPU' + (' + CUDA' if o.has_cuda_kernels() else '') if o.has_ops() else 'not built (' + str(o.load_error()) + ')')"
	touch $@

run: setup
	$(PY) -m toolkit.data.shapes --root data/shapes
	$(PY) -m toolkit.train --dataset shapes --model dsod_tiny --amp --cache-images --workers 0 --out runs/main

# The demo's browser tests need Debian's chromium: installed here when missing and allowed (root with apt-get,
# as in CI); elsewhere they skip with the reason (they fail under CI=true).
test: setup browser
	$(PY) -m pytest -q

browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium for the browser tests (apt-get)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else \
		echo "chromium not found: the browser tests will skip (apt-get install chromium)"; \
	fi

bench: setup
	$(PY) bench/bench_ms_deform_attn.py
	$(PY) bench/bench_data_pipeline.py
	$(PY) bench/bench_eval.py
	$(PY) bench/bench_train.py

clean-venv:
	rm -rf $(VENV)
