# Two entry points for a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test bench clean

$(BIN)/poller: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $(BIN)/poller

setup: $(BIN)/poller

demo: setup
	$(BIN)/poller demo

test: setup
	$(BIN)/python -m pytest -ra $(PYTEST_ARGS)

bench: setup
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) build *.egg-info
