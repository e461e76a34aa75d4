# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
# Both bootstrap .venv; the install is skipped while pyproject.toml and constraints.txt are unchanged.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
DEPS_HASH := $(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(DEPS_HASH)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlruns/mlflow.db

.PHONY: venv demo test test-fast lab bench mlflow-ui clean

venv: $(STAMP)

$(STAMP):
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools
	@# llama-cpp-python compiles from source (~6 min on 2 cores); pip's wheel cache keeps it for next time.
	$(PY) -m pip install -c constraints.txt -e '.[dev]'
	@# into the venv, not ~/.local: every clone gets its own kernel, and a venv prefers its own (jupyter_core)
	$(PY) -m ipykernel install --sys-prefix --name ruvllm-lab --display-name "RuvLLM lab (.venv)" >/dev/null
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: venv
	$(PY) -m ruvllm_lab.demo

test: venv
	$(PY) -m pytest --cov=ruvllm_lab --cov-report=term --cov-report=xml:coverage.xml

test-fast: venv
	$(PY) -m pytest -m "not slow" -x -q

# JupyterLab on the venv's kernel; as root (containers) it needs --allow-root.
lab: venv
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks --MappingKernelManager.default_kernel_name=ruvllm-lab \
		$(if $(filter 0,$(shell id -u)),--allow-root)

bench: venv
	$(PY) benches/inference.py && $(PY) benches/memory.py && $(PY) benches/router.py && $(PY) benches/pipeline.py

mlflow-ui: venv
	@mkdir -p mlruns
	$(VENV)/bin/mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI) --port 5000

clean:
	rm -rf .pytest_cache coverage.xml .coverage
