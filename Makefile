# keybroker: `make run` starts the broker, `make test` runs every check. Both set up .venv.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: run test lint pytest bench install clean agent-dist agent-check screenshots

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "keybroker needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Re-install only when the dependencies change; a second `make run` starts at once.
# The server's distribution was named keybroker before that name went to the agent side
# (agent/): a virtualenv from before gets the old one out of the way first.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	@$(BIN)/pip uninstall -q -y keybroker 2>/dev/null || true
	$(BIN)/pip install -q -e .
	@touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	@$(BIN)/pip uninstall -q -y keybroker 2>/dev/null || true
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@ $(VENV)/.installed

# The agent side alone (agent/pyproject.toml): what `pip install keybroker` installs on an
# agent's machine. `make agent-dist` builds its wheel and sdist into dist/;
# `make agent-check` installs the wheel into a fresh virtualenv (httpx from the package
# index) and checks the CLI runs there without Django.
agent-dist: $(VENV)/.installed-dev
	rm -rf dist/agent && $(BIN)/python -m build -q --outdir dist/agent agent

agent-check: agent-dist
	rm -rf dist/agent-venv && $(PYTHON) -m venv dist/agent-venv
	dist/agent-venv/bin/pip install -q dist/agent/keybroker-*.whl
	dist/agent-venv/bin/keybroker --help > /dev/null
	! dist/agent-venv/bin/python -c 'import django' 2>/dev/null
	@echo "agent-check: keybroker runs in a fresh virtualenv without Django"

install: $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/python manage.py migrate --noinput
	exec $(BIN)/python manage.py serve --ensure-admin

test: lint pytest

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

pytest: $(VENV)/.installed-dev
	$(BIN)/pytest $(PYTEST_ARGS)

# docs/screenshots/: each admin page at 1,400 x 900, from the browser tests.
screenshots: $(VENV)/.installed-dev
	KEYBROKER_SCREENSHOTS_DIR=docs/screenshots $(BIN)/pytest -q \
	  tests/test_operator_screens.py tests/test_usage_browser.py

# The proxy benchmark (bench/README.md): timings live here, never in `make test`.
bench: $(VENV)/.installed-dev
	@$(BIN)/python -c 'import aiohttp, httpx_aiohttp, pyinstrument' 2>/dev/null || $(BIN)/pip install -q -e '.[dev,bench]'
	$(BIN)/python -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache dist
