# Quick start: `make test` and `make reproduce` work on a fresh machine with only Python and pip.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch is pinned and installed first so that no multi-GB CUDA build is pulled in.
TORCH  := torch==2.13.0
# The oldest transformers we support: the lower bound of "transformers>=X,<6" in pyproject.toml.
COMPAT_VENV := .venv-compat
TRANSFORMERS_MIN := $(shell sed -n 's/.*"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml)
# The test files that exercise transformers: infoscale.hf, the GAU PreTrainedModel, checkpoint conversion.
COMPAT_TESTS := tests/test_hf.py tests/test_model_train.py tests/test_convert.py

.PHONY: install test test-all test-compat lint reproduce bench clean

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

# test-compat exists because transformers' internal API moves within 5.x and infoscale.hf depends on it: .venv
# (make test) gets the newest transformers pyproject.toml allows, .venv-compat gets the OLDEST, so CI tests both
# ends of "transformers>=X,<6". Seen so far: the mask functions take cache_position before 5.4 and
# q_length/q_offset from 5.4; before 5.7 set_attn_implementation refuses ModernBERT; 5.0's ModernBERT does not use
# AttentionInterface at all (hence X = 5.1.0). Raising X: change pyproject.toml only.
$(COMPAT_VENV)/.installed: pyproject.toml
	@test -n "$(TRANSFORMERS_MIN)" || { echo "no transformers>=X,<6 lower bound found in pyproject.toml"; exit 1; }
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/pip install -q --upgrade pip
	$(COMPAT_VENV)/bin/pip install -q $(TORCH) numpy
	$(COMPAT_VENV)/bin/pip install -q -e '.[dev]' 'transformers==$(TRANSFORMERS_MIN)'
	touch $@

test-compat: $(COMPAT_VENV)/.installed
	$(COMPAT_VENV)/bin/python -c "import transformers; print('transformers', transformers.__version__)"
	$(COMPAT_VENV)/bin/python -m pytest -m "not slow" -q $(COMPAT_TESTS)

reproduce: install
	$(BIN)/infoscale reproduce --preset quick

bench: install
	$(BIN)/python benchmarks/attention_speed.py

clean:
	rm -rf $(VENV) $(COMPAT_VENV) build src/*.egg-info .pytest_cache
