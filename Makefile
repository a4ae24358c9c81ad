# Two entry points for a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup demo lint test bench clean

$(BIN)/poller: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,lint]'
	@# LocalStack needs Python 3.13 (PEP 695); poller/kit/installcache.py installs it into a cache on first use.
	@touch $(BIN)/poller

setup: $(BIN)/poller

demo: setup
	$(BIN)/poller demo

# ruff on the whole tree, mypy --strict on poller/ and channels/ (pyproject.toml: [tool.ruff], [tool.mypy]).
# Both run, so one pass shows every finding; either failing fails the target.
lint: setup
	status=0; $(BIN)/ruff check . || status=1; $(BIN)/python -m mypy || status=1; exit $$status

# pytest's exit code 5 ("no tests ran") is not a failure of the build; every other code is.
test: setup
	$(BIN)/python -m pytest -ra $(PYTEST_ARGS) || [ $$? -eq 5 ]

# The full preset (~10 minutes on 2 cores; also rewrites benchmarks/RESULTS.md); BENCH_ARGS=--quick: ~2.
bench: setup
	$(BIN)/pip install --quiet -e '.[test,bench]'
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
