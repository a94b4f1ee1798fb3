# `make demo` and `make test` set everything up themselves: a virtual environment in .venv with the
# project and its extras installed (torch pinned to the CPU build in pyproject.toml).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
API_PORT ?= 8000
UI_PORT  ?= 8501

.PHONY: install test test-fast lint demo bench screenshot system-deps docker-test clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[serve,ui,data,dev]'
	touch $(STAMP)

install: $(STAMP)

# Debian's chromium for the real-browser test (Playwright drives it; no browser download).
system-deps:
	@if ! command -v chromium >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else \
	    echo "chromium is missing: install it with 'sudo apt-get install chromium' (Debian/Ubuntu)"; exit 1; \
	  fi; \
	fi

lint: install
	$(VENV)/bin/ruff check src tests benchmarks docker

test: install system-deps lint
	$(PY) -m pytest -q

# The inner loop: everything but the slow tests (notebooks, browser, DDP, ...), in about a minute.
test-fast: install lint
	$(PY) -m pytest -q -m "not slow"

# Re-take docs/playground.png with the bundled model (tests themselves never write into the repository).
screenshot: install system-deps
	SLM_SCREENSHOT=$(CURDIR)/docs/playground.png $(PY) -m pytest -q tests/test_ui.py -k browser

demo: install
	@$(PY) -c "from slm.checkpoint import resolve; import sys; p = resolve('default'); sys.exit(0 if p.is_dir() else f'the bundled model {p} is missing')"
	$(PY) -m slm.demo --api-port $(API_PORT) --ui-port $(UI_PORT)

bench: install
	$(PY) -m slm.cli bench --preset slm-16m --lengths 64,128,256,512 --json benchmarks/bench-slm-16m.json \
	  --plot benchmarks/bench-slm-16m.png

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# Build the slm-api and slm-ui images on a locally made base, run the compose stack on host networking,
# exercise the API and the UI (headless Chromium), then tear everything down (see docker/test.sh).
docker-test: install
	bash docker/test.sh
