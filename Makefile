# charllm: the two commands are `make demo` and `make test` (see README.md).
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
LOCK := requirements.lock
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
ENV := source scripts/airflow-env.sh &&
PYTEST_ARGS ?=

.PHONY: demo test venv venv-dev lint typecheck ui airflow-init bench clean

# What the demo and the UI need (Airflow, torch, the analysis). --no-compile: Python writes the
# bytecode of the modules it imports on first use instead of pip compiling ~1 GB of site-packages
# up front (most of which nothing imports); this halves a fresh install (docs/benchmarks.md).
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-compile -c $(LOCK) -e '.[airflow,analysis,train]'
	touch $(STAMP)

# ... plus the test, lint and browser tools (pytest, ruff, mypy, playwright)
$(DEV_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q --no-compile -c $(LOCK) -e '.[airflow,analysis,train,dev]'
	touch $(DEV_STAMP)

venv: $(STAMP)

venv-dev: $(DEV_STAMP)

airflow-init: $(STAMP)
	$(ENV) $(BIN)/airflow db migrate > $$AIRFLOW_HOME/db-migrate.log 2>&1 || (tail -50 $$AIRFLOW_HOME/db-migrate.log; exit 1)
	$(ENV) $(BIN)/python -m charllm.orchestrate.pools >> $$AIRFLOW_HOME/db-migrate.log 2>&1 || (tail -20 $$AIRFLOW_HOME/db-migrate.log; exit 1)

## The main job: the demo campaign through Airflow on the local backend (SQLite metadata).
demo: airflow-init
	$(ENV) PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/charllm demo

## The whole test suite (starts PostgreSQL and the Slurm dev cluster when it can).
test: $(DEV_STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(DEV_STAMP)
	$(BIN)/ruff check charllm tests dags benchmarks
	$(BIN)/ruff format --check charllm tests dags benchmarks

typecheck: $(DEV_STAMP)
	$(BIN)/mypy

## The Airflow UI with the campaign DAGs: http://localhost:8080 (see README).
ui: airflow-init
	$(ENV) PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/airflow standalone

bench: $(STAMP)
	$(ENV) $(BIN)/python benchmarks/dag_parse.py
	$(ENV) $(BIN)/python benchmarks/demo_overhead.py

clean:
	rm -rf var airflow-home
