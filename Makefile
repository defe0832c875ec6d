# The two commands: `make demo` (the main job) and `make test` (the whole suite).
# Both build .venv from the package registries first (through `make install`).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install browser demo test lint unit integration e2e schema clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The dashboard's browser test drives Debian's Chromium (not a downloaded browser build).
CHROMIUM ?= /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

browser:
	@[ -x $(CHROMIUM) ] || { echo "installing Debian's chromium for the dashboard test"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null; }

demo: install
	$(BIN)/quotaflow demo $(ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: install browser lint
	$(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

unit: install
	$(BIN)/python -m pytest -q tests/unit

integration: install
	$(BIN)/python -m pytest -q tests/integration

e2e: install browser
	$(BIN)/python -m pytest -q tests/e2e

# Regenerate the checked-in JSON Schema after changing the usage record model.
schema: install
	$(BIN)/quotaflow schema > config/schema/usage-record.v2.schema.json

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .quotaflow
