# Two entry points for a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup compile demo lint test test-fast bench image image-smoke lock clean

# The runtime's versions come from requirements.lock, as in the image. It is a constraints file
# here (the test and lint tools are not in it), and pip reads hashes in a constraints file as
# --require-hashes for everything: setup uses a copy without them.
$(BIN)/poller: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	sed -E '/^ +--hash=/d; s/ *\\$$//' requirements.lock > $(VENV)/constraints.txt
	@# Pure here: `make compile` (below) builds the hot path in place, with the venv's mypy.
	SQS_POLLER_PURE_PYTHON=1 $(BIN)/pip install --quiet -c $(VENV)/constraints.txt -e '.[test,lint]'
	@# LocalStack needs Python 3.13 (PEP 695); poller/kit/installcache.py installs it into a cache on first use.
	@touch $(BIN)/poller

# The hot path compiled with mypyc (setup.py's HOT_MODULES), in place: the .so files sit next to the
# sources and are imported first. Built again whenever one of those sources changes, so the tests,
# the demo and the benchmark run what is checked in (tests/conftest.py refuses a stale build).
# No C compiler or Python headers: the modules stay pure Python. ~1 minute on 2 cores.
HOT_SOURCES := $(shell sed -n 's/^    "\(.*\.py\)",$$/\1/p' setup.py)
$(VENV)/compiled.stamp: $(BIN)/poller setup.py $(HOT_SOURCES)
	$(BIN)/python setup.py --quiet build_ext --inplace
	@# build_ext skips a library whose C is unchanged: touched, it is newer than the sources it was built from.
	@find poller -maxdepth 1 -name '_hotpath__mypyc.*.so' -exec touch {} +
	@touch $@

compile: $(VENV)/compiled.stamp

setup: $(BIN)/poller $(VENV)/compiled.stamp

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
# The checkout's modules are compiled first, as pip compiles an installed wheel's (an editable
# install is not; with PYTHONDONTWRITEBYTECODE set, each start would compile them again: ~0.1 s).
bench: setup
	SQS_POLLER_PURE_PYTHON=1 $(BIN)/pip install --quiet -e '.[test,bench]'
	$(BIN)/python -m compileall -q poller channels benchmarks
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

# The image: docker where a daemon answers, else buildah (--format docker: the OCI format has no
# HEALTHCHECK). IMAGE=name:tag names it; BUILD_ARGS="--build-arg UID=2000" goes to the builder.
# No --layers for buildah: its layer cache reuses a `RUN --mount=from=build` step after the build
# stage changed (and buildah 1.28 then fails to mount the cached stage).
IMAGE ?= sqs-poller:dev
BUILD_ARGS ?=
image:
	@if docker info >/dev/null 2>&1; then set -x; docker build $(BUILD_ARGS) -t $(IMAGE) .; \
	elif command -v buildah >/dev/null 2>&1; then \
	  set -x; buildah build --format docker $(BUILD_ARGS) -t $(IMAGE) .; \
	else echo "make image: no Docker daemon answers and buildah is not installed" >&2; exit 1; fi

# Builds the image and runs it locked down against LocalStack and a local sink
# (tests/test_image.py; it says why when it skips: no builder, no base image).
image-smoke: setup
	$(BIN)/python -m pytest -ra -p no:cacheprovider tests/test_image.py $(PYTEST_ARGS)

# Refresh the lock files to the newest versions pyproject.toml allows (pip-tools, from the lock
# extra): requirements.lock (the runtime; setup's constraints) and requirements-msk.lock (with
# the msk extra; what the image installs). The msk lock starts from a copy of the runtime's, so
# the two agree on every version they share.
LOCK := CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/pip-compile --quiet --generate-hashes --strip-extras \
	--no-emit-index-url --no-emit-find-links pyproject.toml
lock: setup
	SQS_POLLER_PURE_PYTHON=1 $(BIN)/pip install --quiet -c $(VENV)/constraints.txt -e '.[lock]'
	$(LOCK) --upgrade --output-file requirements.lock
	cp requirements.lock requirements-msk.lock
	$(LOCK) --extra msk --output-file requirements-msk.lock

clean:
	rm -rf $(VENV) build *.egg-info
	find poller channels -name '*.so' -delete
