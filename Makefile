# Two commands a fresh Debian machine needs: `make demo` and `make test`.
# Both install what they need (Debian packages, then a virtualenv with sohoa and its dependencies).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
BENCH_ARGS ?=
# The Ansible controller's tools live in their own virtualenv (their pins must not meet ours).
ANSIBLE_VENV ?= .venv-ansible
ANSIBLE_STAMP := $(ANSIBLE_VENV)/.installed

.PHONY: demo test lint fleet-lint ansible-venv wheelhouse torture bench deps venv clean

deps:
	bash firmware-scripts/install-packages.sh dev

$(STAMP): pyproject.toml
	$(MAKE) deps
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

$(ANSIBLE_STAMP): ansible/requirements-controller.txt
	test -x $(ANSIBLE_VENV)/bin/python || $(PYTHON) -m venv $(ANSIBLE_VENV)
	$(ANSIBLE_VENV)/bin/python -m pip install -q -r ansible/requirements-controller.txt
	touch $(ANSIBLE_STAMP)

ansible-venv: $(ANSIBLE_STAMP)

# ansible-lint (production profile) and yamllint on ansible/, shellcheck on every shell script.
fleet-lint: $(ANSIBLE_STAMP)
	cd ansible && PATH="$(CURDIR)/$(ANSIBLE_VENV)/bin:$$PATH" yamllint --strict .
	cd ansible && PATH="$(CURDIR)/$(ANSIBLE_VENV)/bin:$$PATH" ANSIBLE_CONFIG=ansible.cfg \
		ansible-lint --profile production --nocolor
	shellcheck firmware-scripts/*.sh .ci/run

# What the controller ships to the boxes (they may not reach a package index): sohoa's wheel and
# a wheel of every dependency, for Debian 12's Python 3.11.
wheelhouse: $(STAMP)
	$(BIN)/python -m pip wheel -q --wheel-dir dist/wheelhouse ".[edge,central]"

demo: $(STAMP)
	$(BIN)/sohoa demo --exit-when-synced

test: $(STAMP) $(ANSIBLE_STAMP)
	$(BIN)/ruff check protocol edge central sohoa tests bench
	$(BIN)/mypy protocol edge central sohoa
	$(BIN)/lint-imports
	$(MAKE) fleet-lint
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(STAMP) fleet-lint
	$(BIN)/ruff check .
	$(BIN)/mypy protocol edge central sohoa

torture: $(STAMP)
	$(BIN)/pytest -m torture $(PYTEST_ARGS)

# Every figure a ratio against a baseline measured in the same run: bench/results.json and a table
# (about 15 minutes on 2 cores; BENCH_ARGS=--quick for a few minutes, --only NAME,... for some).
bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(ANSIBLE_VENV) dist .pytest_cache .mypy_cache .ruff_cache
