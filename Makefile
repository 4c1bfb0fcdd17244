# The two commands of the README: `make demo` and `make test`. Both set everything up first.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint typecheck unit bench-ingest clean

demo:
	scripts/bootstrap.sh
	$(BIN)/glioforecast demo

test:
	scripts/bootstrap.sh test,dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=20 $(PYTEST_ARGS)

lint:
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

bench-ingest:
	$(BIN)/python -m bench.ingest

clean:
	rm -rf $(VENV) build dist *.egg-info glioforecast-data demo-output
