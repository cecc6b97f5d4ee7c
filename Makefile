# The two README commands (`make demo`, `make test`) do all set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WORKDIR ?= workdir

.PHONY: demo test lint bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m experiments.demo --workdir=$(WORKDIR)

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup -q --durations=15

lint: $(STAMP)
	$(BIN)/ruff check xeno_jax data_builders experiments tests

bench: $(STAMP)
	for b in experiments/benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) $(WORKDIR)
