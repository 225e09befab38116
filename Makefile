# Quick start: `make test` and `make reproduce` work on a fresh machine with only Python and pip.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch is pinned and installed first so that no multi-GB CUDA build is pulled in.
TORCH  := torch==2.13.0

.PHONY: install test test-all lint reproduce bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH) numpy
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

lint: install
	$(BIN)/ruff check .

test: install lint
	$(BIN)/python -m pytest -m "not slow" -q

test-all: install
	$(BIN)/python -m pytest -q

reproduce: install
	$(BIN)/infoscale reproduce --preset quick

bench: install
	$(BIN)/python benchmarks/attention_speed.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
