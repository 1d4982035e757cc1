# Two commands: `make train` (the default pretraining job) and `make test` (the suite).
# Both create .venv on first use. On a machine without CUDA, torch==2.13.0 (CPU build) is
# installed before the project so pip never pulls a multi-GB CUDA wheel.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: setup train test test-all clean-venv wheelhouse

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch; \
	else $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[test]'
	touch $@

train: setup
	$(PY) -m megatron_ext.train $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

test-all: setup
	$(PY) -m pytest -q -m '' $(ARGS)

# Offline installs for GPU nodes without internet (README: GPU nodes without internet).
# `make wheelhouse PY=3.12` names the nodes' Python version (PY is the venv's python otherwise).
WHEEL_PY = $(if $(filter command line,$(origin PY)),$(PY),3.12)
wheelhouse:
	PY=$(WHEEL_PY) PYTHON=$(PYTHON) tools/wheelhouse.sh wheelhouse

clean-venv:
	rm -rf $(VENV)
