# sqs-poller: `make image` (docker build where a daemon answers, else buildah), or
# `docker build -t sqs-poller .` (BuildKit, the default builder since Docker 23: RUN --mount needs
# it). podman and buildah keep the HEALTHCHECK only with `--format docker`.
#
# Two stages. `build` turns the project into a wheel, its hot path compiled with mypyc (setup.py;
# the stage's gcc), and downloads the wheels of every dependency at the versions and hashes
# requirements-msk.lock names (confluent-kafka, uvloop, httptools and orjson ship manylinux wheels,
# so nothing else is compiled); the final stage installs them into a venv from that local
# wheelhouse, offline, and keeps no compiler, no source tree and no wheel files.
#
# The base is pinned by Python version and Debian release. For byte-for-byte rebuilds pin the
# digest too (python:3.11-slim-bookworm@sha256:...) and let Renovate/Dependabot move it.

FROM python:3.11-slim-bookworm AS build
# A compiler for the wheel's mypyc build, in this stage only. Unpinned: bookworm's security updates
# move libc6-dev's version, and a pin would fail every build after one.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# .dockerignore lets in only what the wheel needs: pyproject.toml, setup.py, README.md (the
# package's long description), LICENSE and the two packages, and the lock file.
COPY . .
# /dist: the project's own wheel; /wheels: the locked dependencies with the msk extra
# (aws-msk-iam-sasl-signer-python, for --kafka-auth iam), and the lock itself. --only-binary: a
# wheel built here from an sdist would not match the lock's hashes.
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist . \
 && pip download --no-cache-dir --require-hashes --only-binary :all: --dest /wheels -r requirements-msk.lock \
 && cp requirements-msk.lock /wheels/


FROM python:3.11-slim-bookworm

# A fixed, numeric, non-root UID/GID: the manifests' runAsUser is the same number, and a numeric
# USER lets Kubernetes' runAsNonRoot verify it without reading /etc/passwd. `--build-arg UID=...`
# changes both the passwd entry and USER below.
ARG UID=10001
RUN groupadd --system --gid "${UID}" poller \
 && useradd --system --uid "${UID}" --gid poller --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin poller

# The venv has no pip of its own (the base image's pip installs into it through --python), and
# the wheelhouse is bind-mounted from the build stage for this one step, so it is in no layer.
# First exactly the locked dependencies (hash-checked), then the project without resolving
# anything; `pip check` fails the build if the lock no longer satisfies pyproject.toml. The glob
# keeps this working if the distribution is renamed (sqs-poller is taken on PyPI by an unrelated
# project). pip compiles the .pyc files here: at run time the root filesystem is read-only.
RUN --mount=type=bind,from=build,source=/dist,target=/dist \
    --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m venv --without-pip /opt/venv \
 && pip --python /opt/venv/bin/python install --no-cache-dir --no-index --find-links /wheels \
        --require-hashes -r /wheels/requirements-msk.lock \
 && pip --python /opt/venv/bin/python install --no-cache-dir --no-index --no-deps "$(echo /dist/*.whl)[msk]" \
 && pip --python /opt/venv/bin/python check \
 && /opt/venv/bin/poller --help > /dev/null

# POLLER_HEALTH_PORT / POLLER_METRICS_HOST: /healthz and /readyz on 0.0.0.0:8081, the port the
# deploy/ manifests probe and the HEALTHCHECK below asks. 127.0.0.1 (the poller's own default)
# would hide them from the kubelet and from `docker run -p`.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    POLLER_HEALTH_PORT=8081 \
    POLLER_METRICS_HOST=0.0.0.0

USER ${UID}:${UID}
# health (/healthz, /readyz) and, with POLLER_METRICS_PORT=9090, Prometheus /metrics
EXPOSE 8081 9090

# slim has no curl: ask with Python. With POLLER_METRICS_PORT set the poller serves /healthz on
# the metrics port, so ask there; else on POLLER_HEALTH_PORT. urlopen raises on a 503 or a refused
# connection, so the exit code is the verdict. (Kubernetes ignores HEALTHCHECK: the manifests
# have their own probes on the same endpoint and port.) Only `poller run` serves /healthz.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; port = os.environ.get('POLLER_METRICS_PORT') or os.environ.get('POLLER_HEALTH_PORT') or '8081'; r.urlopen('http://127.0.0.1:%s/healthz' % port, timeout=4)"]

# SIGTERM drains (finish what is held, give back the rest, delete what was acked) within
# --shutdown-timeout (25 s by default); docker and podman give 10 s before SIGKILL unless
# `run --stop-timeout` / `stop -t` allows more.
STOPSIGNAL SIGTERM
ENTRYPOINT ["poller"]
CMD ["run"]
