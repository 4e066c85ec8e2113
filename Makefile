# `make test` is the one test command: it builds its own virtual environment from the
# pinned requirements, then runs lint, types and every test (CI runs exactly this).
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
MIN_VENV ?= .venv-min
TOOLS_VENV ?= .venv-tools
TOOLS = $(TOOLS_VENV)/bin
KUBERNETES_VERSION ?= 1.30.0
# Every Kubernetes object in deploy/ that the cluster's own schemas know (not kustomizations,
# not the PrometheusRule custom resource, which tests/test_deploy.py checks instead).
MANIFESTS = $(shell find deploy/kubernetes -name '*.yaml' ! -name kustomization.yaml ! -name config.yaml | sort)

.PHONY: demo test check lint validate audit unit test-min integration faults crash bench clean

# pytest-xdist workers. Most tests wait on subprocesses and servers (moto, the simulator,
# `poller` itself), so more workers than the two cores pays; each worker starts its own
# moto server once and every test makes its own bucket.
WORKERS ?= 4
XDIST = -n $(WORKERS) --maxschedchunk 1
UNIT = -m "not integration and not faults and not crash"


$(BIN)/activate: requirements.txt requirements-dev.txt requirements-test.txt pyproject.toml
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

# The three environments build, and lint, the validators and the floor tests run, side by
# side (each mostly waits on pip, the network or a subprocess); then the whole suite, whose
# output streams. Each part's output is printed whole when it ends (--output-sync).
test:
	$(MAKE) --no-print-directory -j3 --output-sync=target lint validate test-min
	$(BIN)/pytest $(XDIST) --durations=10

# The developer's loop (under a minute): lint, types and the unit tests.
check: lint
	$(BIN)/pytest $(XDIST) -q $(UNIT)

$(TOOLS)/activate: requirements-tools.txt
	$(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS)/pip install --quiet --upgrade pip
	$(TOOLS)/pip install --quiet -r requirements-tools.txt
	touch $(TOOLS)/activate

# Manifests (strict schemas, then checkov), the Dockerfile (checkov; hadolint is in lint),
# the IAM policies (parliament), the pinned requirements (pip-audit).
validate: $(TOOLS)/activate audit
	$(TOOLS)/kubernetes-validate --strict --quiet -k $(KUBERNETES_VERSION) $(MANIFESTS)
	$(TOOLS)/checkov --quiet --compact --skip-download -d deploy/kubernetes --framework kubernetes
	$(TOOLS)/checkov --quiet --compact --skip-download -f Dockerfile --framework dockerfile
	for policy in deploy/iam/*.json; do \
	  $(TOOLS)/parliament --string "$$(cat $$policy)" < /dev/null || exit 1; done

# Known vulnerabilities in the pinned requirements. Offline (the advisory database cannot be
# reached) it says so and is skipped rather than failing the build.
audit: $(TOOLS)/activate
	@out=$$($(TOOLS)/pip-audit --no-deps --disable-pip -r requirements.txt \
	    --progress-spinner off 2>&1); rc=$$?; echo "$$out"; \
	if echo "$$out" | grep -q "could not be audited\|ConnectionError\|Max retries"; then \
	  echo "pip-audit: the advisory database could not be reached; audit skipped"; \
	else exit $$rc; fi

# The unit tests on the lowest versions pyproject.toml allows: the floors are true.
$(MIN_VENV)/bin/activate: requirements-min.txt requirements-test.txt pyproject.toml
	$(PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/pip install --quiet --upgrade pip
	$(MIN_VENV)/bin/pip install --quiet -r requirements-min.txt -r requirements-test.txt -c requirements-min.txt
	$(MIN_VENV)/bin/pip install --quiet --no-deps -e .
	touch $(MIN_VENV)/bin/activate

test-min: $(MIN_VENV)/bin/activate
	$(MIN_VENV)/bin/pytest -p no:cacheprovider $(XDIST) -q $(UNIT)

unit: $(BIN)/activate
	$(BIN)/pytest $(XDIST) $(UNIT)

faults: $(BIN)/activate
	$(BIN)/pytest $(XDIST) -m faults

crash: $(BIN)/activate
	$(BIN)/pytest $(XDIST) -m crash

bench: $(BIN)/activate
	$(BIN)/python bench/benchmark.py

clean:
	rm -rf $(VENV) $(MIN_VENV) $(TOOLS_VENV) .pytest_cache .mypy_cache .ruff_cache
