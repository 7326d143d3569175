# The two commands in the README: `make demo` and `make test`.
# Each sets up what it needs (a virtualenv in .venv, anvil in node_modules) first.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test setup lint bench clean

demo: $(STAMP)
	$(BIN)/inferledger demo

test: $(STAMP) node_modules/.bin/anvil
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest -n 2 tests

setup: $(STAMP) node_modules/.bin/anvil

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

bench: $(STAMP) node_modules/.bin/anvil
	$(BIN)/python bench/gas.py

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

node_modules/.bin/anvil: package.json
	npm install --no-audit --no-fund
	touch node_modules/.bin/anvil

clean:
	rm -rf $(VENV) node_modules
