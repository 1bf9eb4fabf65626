# Two commands do all the set-up: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 5000

.PHONY: run test test-postgres worker bench bench-http bench-scale clean

$(BIN)/activate: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $(BIN)/activate

run: $(BIN)/activate
	$(BIN)/flask --app app run --host 127.0.0.1 --port $(PORT)

test: $(BIN)/activate
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The same suite on a throwaway PostgreSQL cluster (needs the server binaries: apt-get install postgresql).
test-postgres: $(BIN)/activate
	$(BIN)/python -m pytest --engine postgresql $(PYTEST_ARGS)

worker: $(BIN)/activate
	$(BIN)/flask --app app worker

bench: $(BIN)/activate
	$(BIN)/python bench/fanout.py $(BENCH_ARGS)

bench-http: $(BIN)/activate
	$(BIN)/python bench/http_load.py $(BENCH_ARGS)

bench-scale: $(BIN)/activate
	$(BIN)/python bench/scale.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
