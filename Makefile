# Two commands for a newcomer: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint typecheck bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)  ## run the sidecar (embedded Redis, worker, beat) with a conductor and two followers
	$(BIN)/sidecar up $(DEMO_ARGS)

test: $(STAMP)  ## lint, type-check, check the import contracts, then the whole suite (starts its own Redis, workers, beat)
	$(BIN)/ruff check coordinator workers mixin ops examples tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/pytest -q $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 1; fi; exit $$rc

test-fast: $(STAMP)  ## as `make test`, without the e2e and slow tests (no celery processes, nothing long)
	$(BIN)/ruff check coordinator workers mixin ops examples tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/pytest -q -m "not e2e and not slow" $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 1; fi; exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check coordinator workers mixin ops examples tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP)  ## benchmark suite against anchors measured in the same run -> bench/results.json
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
