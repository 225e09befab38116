# Quick start: `make test` and `make reproduce` work on a fresh machine with only Python and pip.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch is pinned and installed first so that no multi-GB CUDA build is pulled in.
TORCH  := torch==2.13.0
# The oldest transformers we support: the lower bound of "transformers>=X,<6" in pyproject.toml.
COMPAT_VENV := .venv-compat
TRANSFORMERS_MIN := $(shell sed -n 's/.*"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml)
# The test files that exercise transformers: infoscale.hf, the GAU PreTrainedModel, checkpoint conversion, doctor.
COMPAT_TESTS := tests/test_hf.py tests/test_hf_cache.py tests/test_model_train.py tests/test_convert.py tests/test_doctor.py
# The lock: the exact version of every Python dependency the suite was last verified with (make test installs
# from it, so the README's test command gives the same result next month). Refresh it with `make lock`.
LOCK   := constraints.txt
EXTRAS := dev,gguf
# transformers' range as pyproject.toml states it, e.g. transformers>=5.1.0,<6 (for make test-newest)
TRANSFORMERS_RANGE := $(shell sed -n 's/^ *"\(transformers>=[^"]*\)".*/\1/p' pyproject.toml)
NEWEST_VENV := .venv-newest

.PHONY: install test test-all test-fast test-compat test-newest lock lint reproduce bench clean

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH) -c $(LOCK)
	$(BIN)/pip install -q -c $(LOCK) -e '.[$(EXTRAS)]'
	touch $@

install: $(VENV)/.installed

lint: install
	$(BIN)/ruff check .

test: install lint
	$(BIN)/python -m pytest -m "not slow" -q

# The fast tier, for the edit-test loop: unit and property tests only (no reproductions, no subprocess command lines,
# no DDP, no kill-and-resume, no training runs; those are marked e2e), on two workers of one thread each: 57 s on
# the project's two quiet cores (84 s on one worker).
test-fast: install lint
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 -m "not slow and not e2e" -q

test-all: install
	$(BIN)/python -m pytest -q

# Refresh the lock: a throw-away venv gets the newest versions pyproject.toml allows (torch stays pinned), and
# their exact versions are written to constraints.txt. Then run `make test` (and update TESTED_TRANSFORMERS in
# src/infoscale/hf/versions.py to the lock's transformers; a test checks the two agree).
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q --upgrade pip
	.venv-lock/bin/pip install -q $(TORCH)
	.venv-lock/bin/pip install -q -e '.[$(EXTRAS)]'
	{ echo "# Exact versions make test installs (pip -c). Refresh: make lock (see the Makefile)."; \
	  .venv-lock/bin/pip freeze --exclude-editable | grep -v '^infoscale' | sed 's/^torch==\([0-9.]*\)+.*/torch==\1/'; } > $(LOCK)
	rm -rf .venv-lock
	rm -f $(VENV)/.installed

# test-compat exists because transformers' internal API moves within 5.x and infoscale.hf depends on it: .venv
# (make test) gets the newest transformers pyproject.toml allows, .venv-compat gets the OLDEST, so CI tests both
# ends of "transformers>=X,<6". Seen so far: the mask functions take cache_position before 5.4 and
# q_length/q_offset from 5.4; before 5.7 set_attn_implementation refuses ModernBERT; 5.0's ModernBERT does not use
# AttentionInterface at all (hence X = 5.1.0). Raising X: change pyproject.toml only.
$(COMPAT_VENV)/.installed: pyproject.toml $(LOCK)
	@test -n "$(TRANSFORMERS_MIN)" || { echo "no transformers>=X,<6 lower bound found in pyproject.toml"; exit 1; }
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/pip install -q --upgrade pip
	$(COMPAT_VENV)/bin/pip install -q $(TORCH) -c $(LOCK)
	grep -v -i -e '^transformers==' -e '^tokenizers==' -e '^huggingface.hub==' -e '^safetensors==' $(LOCK) > $(COMPAT_VENV)/constraints.txt
	$(COMPAT_VENV)/bin/pip install -q -e '.[$(EXTRAS)]' 'transformers==$(TRANSFORMERS_MIN)' -c $(COMPAT_VENV)/constraints.txt
	touch $@

test-compat: $(COMPAT_VENV)/.installed
	$(COMPAT_VENV)/bin/python -c "import transformers; print('transformers', transformers.__version__)"
	$(COMPAT_VENV)/bin/python -m pytest -m "not slow" -q $(COMPAT_TESTS)

# The newest end of the range: whatever transformers release pyproject.toml allows today (not the lock), so CI
# learns of a breaking release before users do. Everything else comes from the lock. If a new release breaks us
# and cannot be fixed at once, exclude it in pyproject.toml (e.g. "transformers>=5.1.0,<6,!=5.26.0") with a
# comment saying why, so the supported range is always what CI tests.
test-newest:
	@test -n "$(TRANSFORMERS_RANGE)" || { echo "no transformers>=... requirement found in pyproject.toml"; exit 1; }
	test -x $(NEWEST_VENV)/bin/python || $(PYTHON) -m venv $(NEWEST_VENV)
	$(NEWEST_VENV)/bin/pip install -q --upgrade pip
	$(NEWEST_VENV)/bin/pip install -q $(TORCH) -c $(LOCK)
	grep -v -i -e '^transformers==' -e '^tokenizers==' -e '^huggingface.hub==' -e '^safetensors==' $(LOCK) > $(NEWEST_VENV)/constraints.txt
	$(NEWEST_VENV)/bin/pip install -q -e '.[$(EXTRAS)]' -c $(NEWEST_VENV)/constraints.txt
	$(NEWEST_VENV)/bin/pip install -q --upgrade '$(TRANSFORMERS_RANGE)' -c $(NEWEST_VENV)/constraints.txt
	$(NEWEST_VENV)/bin/python -c "import transformers; print('transformers', transformers.__version__, '(newest allowed)')"
	$(NEWEST_VENV)/bin/python -m pytest -m "not slow" -q $(COMPAT_TESTS)

reproduce: install
	$(BIN)/infoscale reproduce --preset quick

bench: install
	$(BIN)/python benchmarks/attention_speed.py

clean:
	rm -rf $(VENV) $(COMPAT_VENV) $(NEWEST_VENV) .venv-lock build src/*.egg-info .pytest_cache
