# Two entry points for a new user: `make demo` (the main job) and `make test` (the tests).
# Both create ./.venv on first use and install what they need into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# torch is pinned to the CPU build that lies on this machine's disk; letting pip resolve a
# newer torch pulls gigabytes of CUDA wheels.
TORCH := torch==2.13.0

.PHONY: demo test test-fast lint bench clean-venv

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check $(TORCH)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[cli,eval,export,openvino,dev]' $(TORCH)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tggbc demo

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest

# The tests without the slow ones (exports, generated scenes, subprocesses): about a minute.
test-fast: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: $(STAMP)
	$(BIN)/tggbc bench --preset streampetr-v2-99-1600x640 --threads 2

clean-venv:
	rm -rf $(VENV)
