# Two entry points for a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup demo lint test test-fast bench clean

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
# The suite runs on TEST_WORKERS pytest-xdist workers sharing one LocalStack and one tansu: most
# of its time is spent waiting (outages, long polls, visibility timeouts), so more workers than
# cores pay. --dist loadgroup keeps the tests of one xdist_group on one worker. TEST_WORKERS=0
# runs everything in one process.
TEST_WORKERS ?= 3
test: setup
	$(BIN)/python -m pytest -ra -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS) || [ $$? -eq 5 ]

# The edit loop: the unit tests, no services (nothing marked integration or slow), under a minute.
# Their waits are real deadlines of a second or two, not CPU: four workers pay on two cores.
test-fast: setup
	$(BIN)/python -m pytest -q -n 4 -m "not integration and not slow" $(PYTEST_ARGS) || [ $$? -eq 5 ]

# The full preset (~10 minutes on 2 cores; also rewrites benchmarks/RESULTS.md); BENCH_ARGS=--quick: ~2.
bench: setup
	$(BIN)/pip install --quiet -e '.[test,bench]'
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
