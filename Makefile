# graphdistill: `make demo` sets everything up and runs the main job; `make test` sets up and runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch is installed first and on its own: where this machine's pip constraints cap torch (the files lie on
# disk), take exactly those; elsewhere keep whatever torch the user has, or install pip's default build.
TORCH_SPEC ?= $(shell if [ -f /etc/xdg/pip/constraints.txt ] && grep -q 'torch<=2.14.1' /etc/xdg/pip/constraints.txt; then echo 'torch==2.14.1 torchvision==0.29.1'; else echo 'torch torchvision'; fi)
STAMP := $(VENV)/.graphdistill-setup-$(shell cat pyproject.toml Makefile | sha256sum | cut -c1-16)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export YOLO_OFFLINE := 1
export YOLO_AUTOINSTALL := 0
export ANONYMIZED_TELEMETRY := False
export PIP_DISABLE_PIP_VERSION_CHECK := 1

# graphdistill ui's Try-it page runs the student with onnxruntime-web (WASM): its files come from the npm
# registry at setup time, into a git-ignored folder the app serves (no CDN at run time). The browser tests
# drive Debian's Chromium through Playwright; npm and chromium are installed with apt when missing.
ORT_WEB_VERSION := 1.31.1
ORT_WEB_FILES := ort.wasm.min.js ort-wasm-simd-threaded.mjs ort-wasm-simd-threaded.wasm
UI_VENDOR := src/graphdistill/ui/static/vendor/ort
UI_STAMP := $(UI_VENDOR)/.onnxruntime-web-$(ORT_WEB_VERSION)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo demo-quick test test-fast bench lint clean ui-assets browser

setup: $(STAMP) ui-assets browser
	@$(VENV)/bin/graphdistill weights fetch

ui-assets: $(UI_STAMP)

$(UI_STAMP):
	@command -v npm >/dev/null || ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq npm)
	@rm -rf $(UI_VENDOR) && mkdir -p $(UI_VENDOR)
	@tmp=$$(mktemp -d) && (cd $$tmp && npm pack --silent onnxruntime-web@$(ORT_WEB_VERSION) >/dev/null \
		&& tar xzf onnxruntime-web-$(ORT_WEB_VERSION).tgz) \
		&& cp $(addprefix $$tmp/package/dist/,$(ORT_WEB_FILES)) $$tmp/package/package.json $(UI_VENDOR)/ && rm -rf $$tmp
	@touch $@

# the system's Chromium for the UI's browser tests (Playwright is told its path; it downloads no browser)
browser:
	@command -v chromium >/dev/null || ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium)

$(STAMP):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PIP) install -q --upgrade 'pip>=25.1'
	@$(PY) -c 'import torch, torchvision' 2>/dev/null || $(PIP) install $(TORCH_SPEC)
	$(PIP) install -e '.[all]' --group dev
	@rm -f $(VENV)/.graphdistill-setup-*
	@touch $@

demo: setup
	$(VENV)/bin/graphdistill demo $(DEMO_ARGS)

demo-quick: setup
	$(VENV)/bin/graphdistill demo --quick

# the linters first: CI runs `make test`, so ruff and mypy are enforced wherever the tests are
test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m 'not slow' $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/run_all.py

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache .mypy_cache $(UI_VENDOR) test-artifacts
