# Quickstart: `make demo` and `make test`. Each creates .venv when missing and installs llmlab into it.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# pytest-xdist workers for `make test`, one intra-op thread each (tests/conftest.py); test files stay whole
# on one worker (--dist loadfile), so module fixtures are built once. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2

.PHONY: demo test lint install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/llmlab demo

test: $(VENV)/.installed-test
	$(BIN)/ruff check llmlab tests benchmarks
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

lint: $(VENV)/.installed-test
	$(BIN)/ruff check llmlab tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
