# `make test` is the one test command: it builds its own virtual environment from the
# pinned requirements, then runs lint, types and every test (CI runs exactly this).
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
MIN_VENV ?= .venv-min

.PHONY: demo test lint unit test-min integration faults crash bench clean

$(BIN)/activate: requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(BIN)/activate

# The first command on a fresh machine: the real daemon against a local Threat Stack
# simulator and a local S3 server (moto, from the same pinned environment). Ctrl-C stops it.
demo: $(BIN)/activate
	$(BIN)/poller demo

lint: $(BIN)/activate
	$(BIN)/ruff check poller tests bench
	$(BIN)/ruff format --check poller tests bench
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile

test: lint test-min
	$(BIN)/pytest

# The unit tests on the lowest versions pyproject.toml allows: the floors are true.
$(MIN_VENV)/bin/activate: requirements-min.txt requirements-test.txt pyproject.toml
	$(PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/pip install --quiet --upgrade pip
	$(MIN_VENV)/bin/pip install --quiet -r requirements-min.txt -r requirements-test.txt -c requirements-min.txt
	$(MIN_VENV)/bin/pip install --quiet --no-deps -e .
	touch $(MIN_VENV)/bin/activate

test-min: $(MIN_VENV)/bin/activate
	$(MIN_VENV)/bin/pytest -p no:cacheprovider -m "not integration and not faults and not crash"

unit: $(BIN)/activate
	$(BIN)/pytest -m "not integration and not faults and not crash"

faults: $(BIN)/activate
	$(BIN)/pytest -m faults

crash: $(BIN)/activate
	$(BIN)/pytest -m crash

bench: $(BIN)/activate
	$(BIN)/python bench/benchmark.py

clean:
	rm -rf $(VENV) $(MIN_VENV) .pytest_cache .mypy_cache .ruff_cache
