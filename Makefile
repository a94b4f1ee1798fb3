# `make demo` and `make test` set everything up themselves: a virtual environment in .venv with the
# project and its extras installed (torch pinned to the CPU build in pyproject.toml).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
API_PORT ?= 8000
UI_PORT  ?= 8501

.PHONY: llama-cpp install test test-fast lint demo bench screenshot notebooks system-deps docker-test clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[serve,ui,data,dev]'
	touch $(STAMP)

install: $(STAMP)

# Debian packages: chromium for the real-browser test (Playwright drives it; no browser download), cmake and
# g++ to build llama.cpp's tools for the GGUF tests and benchmarks (tools/build_llama_cpp.py).
SYSTEM_PACKAGES := chromium:chromium cmake:cmake c++:g++
system-deps:
	@missing=""; for pair in $(SYSTEM_PACKAGES); do \
	  command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "missing:$$missing: install with 'sudo apt-get install$$missing' (Debian/Ubuntu)"; exit 1; \
	  fi; \
	fi

# llama.cpp's llama-simple and llama-bench in build/llama.cpp/bin (once; the tests compare our greedy tokens
# with theirs, `slm bench` adds their speed).
llama-cpp: install system-deps
	$(PY) tools/build_llama_cpp.py --out build/llama.cpp

lint: install
	$(VENV)/bin/ruff check src tests benchmarks docker tools

test: install system-deps lint llama-cpp
	$(PY) -m pytest -q

# The inner loop: everything but the slow tests (notebooks, browser, DDP, own servers), on two workers
# (pytest-xdist; each file on one worker, so its module fixtures start once): ~90 s on 2 cores.
test-fast: install lint
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow"

# Re-take docs/playground.png with the bundled model (tests themselves never write into the repository).
screenshot: install system-deps
	SLM_SCREENSHOT=$(CURDIR)/docs/playground.png $(PY) -m pytest -q tests/test_ui.py -k browser

# Re-run both notebooks in full and save their outputs (after the bundled model changes).
notebooks: install
	$(PY) tools/run_notebooks.py

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
