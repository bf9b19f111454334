# Set-up is idempotent: the venv is (re)built only when pyproject or constraints change.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_OUT ?= demo_out

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml constraints.txt docker/install.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	bash docker/install.sh $(BIN)/python dev --editable
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/geoseg demo --out $(DEMO_OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check geoseg pipelines tests benchmarks
	$(BIN)/ruff format --check geoseg pipelines tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_pipeline.py

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
