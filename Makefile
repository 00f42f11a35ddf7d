# Two commands a fresh Debian machine needs: `make demo` and `make test`.
# Both install what they need (Debian packages, then a virtualenv with sohoa and its dependencies).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: demo test lint torture bench deps venv clean

deps:
	bash firmware-scripts/install-packages.sh dev

$(STAMP): pyproject.toml
	$(MAKE) deps
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/sohoa demo --exit-when-synced

test: $(STAMP)
	$(BIN)/ruff check protocol edge central sohoa tests bench
	$(BIN)/mypy protocol edge central sohoa
	$(BIN)/lint-imports
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy protocol edge central sohoa
	shellcheck firmware-scripts/*.sh .ci/run

torture: $(STAMP)
	$(BIN)/pytest -m torture $(PYTEST_ARGS)

# Every figure a ratio against a baseline measured in the same run: bench/results.json and a table
# (about 15 minutes on 2 cores; BENCH_ARGS=--quick for a few minutes, --only NAME,... for some).
bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
