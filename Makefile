# The two commands of the README:
#   make demo   install into .venv and run `wirekeep demo`
#   make test   install into .venv and run lint, types, the import contract and the tests
# .ci/run runs `make test`.

VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# The local PostgreSQL the tests use; tests that need it skip without one, except under CI=true.
export WIREKEEP_TEST_POSTGRES_URL ?= postgresql+psycopg://postgres@127.0.0.1:5432/test

.PHONY: install test demo lint protocol

$(BIN)/wirekeep: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

install: $(BIN)/wirekeep

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest

demo: install
	$(BIN)/wirekeep demo

# Regenerate protocol/*_pb2.py(i) from the .proto files.
protocol: install
	PYTHON=$(BIN)/python protocol/generate.sh
