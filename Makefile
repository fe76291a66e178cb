# FuseMix pipeline: `make demo` and `make test` are all a newcomer needs.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export LANCE_LOG ?= error
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: install system-deps test test-slow test-all lint format bench demo ui clean

# The stamp is rebuilt whenever the dependency list or the pinned versions change.
$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch first and pinned: a loose requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,offline,ray,clap]"
	# laion-clap declares numpy<2 and a training stack its audio model does not use; the `clap` extra
	# above holds what that model imports (fusion/encoders/laion.py), so it goes in without its pins.
	$(BIN)/pip install -q --no-deps -c constraints.txt laion-clap
	touch $@

install: system-deps $(BIN)/.installed

# Debian tools the default corpus and the speech checks use; skipped with a message where apt is missing.
system-deps:
	@bash .ci/system-deps.sh

test: install
	$(BIN)/pytest -q

test-slow: install
	$(BIN)/pytest -q -m slow

test-all: install
	$(BIN)/pytest -q -m ""

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install
	$(BIN)/python -m benchmarks

demo: install
	$(BIN)/fusemix demo

ui: install
	$(BIN)/fusemix ui

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
