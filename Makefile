# Two entry points for a fresh machine; each creates its own virtualenv.
#   make demo   pretrain the demo model on the synthetic dataset (CPU, minutes)
#   make test   formatter + linter check, then the whole test suite (what CI runs)
#   make test-fast   the same without the slow tiers (subprocess runs, compiles, the
#                    notebook, training runs)
#   make real-audio  the real-recordings benchmark (root, Debian's archive, ~1.5 h on
#                    2 cores; BENCHMARKS.md "Real recordings")
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= workdirs/demo
REAL_AUDIO_WORK ?= workdirs/real_audio

FAST := not subprocess and not compile and not notebook and not train
# pytest-xdist workers; each takes whole test modules, so a module fixture is built once,
# in tests/conftest.py's order (the longest first), not xdist's (the most tests first).
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder

.PHONY: demo test test-fast lint format real-audio

$(BIN)/.runtime: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

$(BIN)/.dev: $(BIN)/.runtime requirements-dev.txt Makefile
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	# hearvalidator pins `tensorflow` (the full wheel); the stack's tensorflow-cpu serves it.
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps hearvalidator==2021.0.2
	touch $@

demo: $(BIN)/.runtime
	$(BIN)/python launch/train.py --config=configs/demo.py --workdir=$(WORKDIR)

real-audio: $(BIN)/.runtime
	$(BIN)/python -m benchmarks.real_audio --work=$(REAL_AUDIO_WORK)

lint: $(BIN)/.dev
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: $(BIN)/.dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(PYTEST) --durations=15 tests

test-fast: lint
	$(PYTEST) --durations=10 -m "$(FAST)" tests
