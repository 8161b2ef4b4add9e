# Two entry points for a fresh machine with Python 3.11+:
#   make demo   install, start embedded PostgreSQL + Prefect server + deployments, run the demo pipelines
#   make test   install and run the test suite (what CI runs)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint down

# Bytecode is compiled at install, as pip does and uv does not by default: where
# PYTHONDONTWRITEBYTECODE is set, every process (each CLI command, agent, flow run and
# server) would compile Prefect's and its libraries' sources anew, ~3 s of CPU each.
$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -r requirements.lock
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -e .
	$(BIN)/python -m compileall -q flows tasks quality deployments
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/flowyard up
	$(BIN)/flowyard demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -n 4 --durations=30

down: $(STAMP)
	$(BIN)/flowyard down
