# `make test` is the one test command: it builds its own virtual environment from the
# pinned requirements, then runs lint, types and every test (CI runs exactly this).
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: test lint unit integration faults crash bench clean

$(BIN)/activate: requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(BIN)/activate

lint: $(BIN)/activate
	$(BIN)/ruff check poller tests bench
	$(BIN)/ruff format --check poller tests bench
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile

test: lint
	$(BIN)/pytest

unit: $(BIN)/activate
	$(BIN)/pytest -m "not integration and not faults and not crash"

faults: $(BIN)/activate
	$(BIN)/pytest -m faults

crash: $(BIN)/activate
	$(BIN)/pytest -m crash

bench: $(BIN)/activate
	$(BIN)/python bench/benchmark.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
