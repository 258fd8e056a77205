# Two commands set everything up on a fresh machine with python3.12:
#   make train   venv + requirements + Fashion-MNIST files, then train the default config
#                (TRAIN_ARGS="--config.num_epochs=1" and WORKDIR=... pass through to launch.py)
#   make test    venv + dev requirements, then ruff and pytest
PYTHON ?= python3.12
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_DIR ?= /usr/share/datasets/fashion-mnist
WORKDIR ?= workdirs/default
CONFIG ?= configs/default.py
FASHION_FILES := train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz \
                 t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz

.PHONY: train test lint data setup setup-dev setup-tflite clean

# uv installs the same requirements as pip, from the same index, in seconds instead of minutes
# (measured: BENCHMARKS.md). It does not read pip.conf: behind a private index, INSTALLER=pip.
# --compile-bytecode writes the .pyc files pip writes by default: without them, where
# PYTHONDONTWRITEBYTECODE is set, every process compiles jax, flax and orbax from source (5 s).
INSTALLER ?= uv
install = $(if $(filter uv,$(INSTALLER)),$(VENV)/bin/uv pip install -q --compile-bytecode --python $(1),$(1) -m pip install -q)

$(VENV)/.installed: requirements.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; JAX >= 0.11 needs Python >= 3.12 (pyenv install 3.12, or PYTHON=/path/to/python3.12)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip $(filter uv,$(INSTALLER))
	$(call install,$(PY)) -r requirements.txt
	touch $@

# libtpu, the TPU compiler behind `launch.py compile`, goes to its own directory: installed in
# site-packages, every CPU run would probe for TPUs. Its version is the one this jax pins.
LIBTPU_REQUIREMENT = $(PY) -c "import importlib.metadata as m; print(next(r.split(';')[0].strip() for r in m.requires('jax') if r.startswith('libtpu')))"

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(call install,$(PY)) -r requirements-dev.txt
	$(call install,$(PY)) --upgrade --target=$(VENV)/libtpu "$$($(LIBTPU_REQUIREMENT))"
	touch $@

# TensorFlow for `launch.py export --format=tflite`, in its own venv (requirements-tflite.txt).
TFLITE_VENV ?= $(VENV)-tflite

$(TFLITE_VENV)/.installed: $(VENV)/.installed requirements.txt requirements-tflite.txt
	test -x $(TFLITE_VENV)/bin/python || $(PYTHON) -m venv $(TFLITE_VENV)
	$(call install,$(TFLITE_VENV)/bin/python) -r requirements-tflite.txt
	touch $@

setup: $(VENV)/.installed
setup-dev: $(VENV)/.installed-dev
setup-tflite: $(TFLITE_VENV)/.installed

# Fashion-MNIST's four IDX files: Debian's dataset-fashion-mnist package when apt is available.
data:
	@missing=0; for f in $(FASHION_FILES); do [ -f "$(DATA_DIR)/$$f" ] || missing=1; done; \
	if [ $$missing = 1 ] && [ "$(DATA_DIR)" = /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  echo "Installing Debian's dataset-fashion-mnist into $(DATA_DIR)"; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	fi; \
	for f in $(FASHION_FILES); do \
	  [ -f "$(DATA_DIR)/$$f" ] || { echo "error: $(DATA_DIR)/$$f is missing. Put Fashion-MNIST's four IDX files ($(FASHION_FILES)) there (from https://github.com/zalandoresearch/fashion-mnist), or run 'make train DATA_DIR=/your/dir'."; exit 1; }; \
	done

train: setup data
	$(PY) launch.py train --config=$(CONFIG) --config.data_dir=$(DATA_DIR) --workdir=$(WORKDIR) $(TRAIN_ARGS)

lint: setup-dev
	$(PY) -m ruff check .

# On an AVX-512 CPU the numerics tests run a second time with AVX2 code (what CPUs without
# AVX-512 run: XLA:CPU generates different code for each), so both kinds are checked here.
test: setup-dev setup-tflite
	$(PY) -m ruff check .
	TFLITE_PYTHON=$(TFLITE_VENV)/bin/python $(PY) -m pytest -n 2 --durations=15 $(PYTEST_ARGS)
	@if grep -q avx512 /proc/cpuinfo 2>/dev/null; then \
	  echo "AVX-512 CPU: the numerics tests again with AVX2 code (XLA_FLAGS=--xla_cpu_max_isa=AVX2)"; \
	  XLA_FLAGS="$$XLA_FLAGS --xla_cpu_max_isa=AVX2" $(PY) -m pytest -n 2 -m numerics --durations=5 $(PYTEST_ARGS); \
	fi

clean:
	rm -rf $(VENV) $(TFLITE_VENV) workdirs .pytest_cache .ruff_cache
