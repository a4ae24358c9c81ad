"""A local SQS endpoint for the demo, the tests and the benchmarks: :func:`start_sqs`.

In order: an endpoint the caller gave (only checked), LocalStack in Docker if a daemon answers,
LocalStack on the host (its Python 3.13 venv from the install cache), moto's server. Other AWS
services LocalStack runs next to SQS (``services="sqs,s3"``) come along on the same endpoint.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from poller.kit.installcache import localstack_venv
from poller.kit.process import (
    HOST,
    Launch,
    Service,
    ServiceError,
    clean_env,
    free_port,
    http_answers,
    log_file,
    remove_tree,
    start_process,
)

__all__ = ["check_endpoint", "localstack_health", "start_moto", "start_sqs"]

log = logging.getLogger(__name__)

LOCALSTACK_IMAGE = "localstack/localstack"
LOCALSTACK_START_TIMEOUT_S = 90.0
DOCKER_START_TIMEOUT_S = 300.0  # includes pulling the image on first use
MOTO_START_TIMEOUT_S = 30.0
_READY_STATES = frozenset({"available", "running"})


def start_sqs(
    *,
    endpoint: str | None = None,
    port: int | None = None,
    services: str = "sqs",
    cache_dir: Path | None = None,
    log_dir: Path | None = None,
) -> Service:
    """An SQS endpoint (plus the other AWS ``services``, comma separated, e.g. ``"sqs,s3"``).

    Tries: the given ``endpoint`` (only checked, never started), Docker's ``localstack/localstack``,
    LocalStack on the host, moto's server. Set ``SQS_POLLER_DOCKER=0`` to skip Docker.
    """
    wanted = _service_list(services) or ["sqs"]
    if endpoint:
        endpoint = endpoint.rstrip("/")
        check_endpoint(endpoint)
        log.info("using the SQS endpoint %s", endpoint)
        return Service("external", endpoint)

    port = port or free_port()
    failures: list[str] = []
    attempts: list[tuple[str, Callable[[], Service]]] = []
    if os.environ.get("SQS_POLLER_DOCKER", "1") != "0" and _docker_available():
        attempts.append(("docker", lambda: _start_localstack_docker(port, wanted, log_dir)))
    attempts.append(("localstack", lambda: _start_localstack_host(port, wanted, cache_dir, log_dir)))
    attempts.append(("moto", lambda: start_moto(port=port, log_dir=log_dir)))
    for label, attempt in attempts:
        try:
            return attempt()
        except ServiceError as exc:
            log.warning("could not start %s: %s", label, exc)
            failures.append(f"{label}: {str(exc).splitlines()[0]}")
    raise ServiceError("no SQS service could be started (" + "; ".join(failures) + ")")


def check_endpoint(endpoint: str) -> None:
    """ServiceError unless something answers HTTP at ``endpoint`` (an SQS endpoint given)."""
    endpoint = endpoint.rstrip("/")
    if not http_answers(f"{endpoint}/_localstack/health"):
        raise ServiceError(f"nothing answers HTTP at the SQS endpoint {endpoint}")


def localstack_health(endpoint: str) -> dict[str, str] | None:
    """Service states from ``/_localstack/health``, or None if it does not answer as LocalStack."""
    try:
        with urllib.request.urlopen(f"{endpoint.rstrip('/')}/_localstack/health", timeout=2) as r:
            body = json.loads(r.read())
    except (OSError, ValueError):
        return None
    services = body.get("services") if isinstance(body, dict) else None
    return {str(k): str(v) for k, v in services.items()} if isinstance(services, dict) else None


def _services_ready(endpoint: str, wanted: Sequence[str]) -> bool:
    health = localstack_health(endpoint)
    return health is not None and all(health.get(s) in _READY_STATES for s in wanted)


def _service_list(services: str) -> list[str]:
    return [s.strip() for s in services.split(",") if s.strip()]


def _localstack_env(port: int, wanted: Sequence[str]) -> dict[str, str]:
    """What LocalStack is given in Docker and on the host alike."""
    return {
        "SERVICES": ",".join(wanted),
        "LOCALSTACK_HOST": f"{HOST}:{port}",
        "EAGER_SERVICE_LOADING": "1",
        "DISABLE_EVENTS": "1",
        "SQS_ENDPOINT_STRATEGY": "path",  # queue URLs: http://HOST:PORT/queue/REGION/ACCOUNT/NAME
        "LS_LOG": "warn",
    }


def _docker_available() -> bool:
    docker = shutil.which("docker")
    if docker is None:
        return False
    try:
        return subprocess.run(
            [docker, "info"], capture_output=True, timeout=5, stdin=subprocess.DEVNULL
        ).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _start_localstack_docker(port: int, wanted: Sequence[str], log_dir: Path | None) -> Service:
    endpoint = f"http://{HOST}:{port}"
    name = f"sqs-poller-localstack-{port}-{uuid.uuid4().hex[:6]}"
    log.info("starting LocalStack in Docker on %s (first use pulls %s)", endpoint, LOCALSTACK_IMAGE)
    cleanup: list[Callable[[], object]] = []
    # The foreground `docker run` is our pid: SIGTERM is proxied to the container; `rm -f` covers SIGKILL.
    cleanup.append(lambda: subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60))
    argv = ["docker", "run", "--rm", "--name", name, "-p", f"{HOST}:{port}:4566"]
    for k, v in _localstack_env(port, wanted).items():
        argv += ["-e", f"{k}={v}"]
    argv.append(LOCALSTACK_IMAGE)
    launch = Launch("localstack-docker", tuple(argv), endpoint, log_file(log_dir, "localstack", port, cleanup))
    return start_process(launch, lambda: _services_ready(endpoint, wanted), DOCKER_START_TIMEOUT_S, cleanup)


def _start_localstack_host(
    port: int, wanted: Sequence[str], cache_dir: Path | None, log_dir: Path | None
) -> Service:
    endpoint = f"http://{HOST}:{port}"
    log.info("starting LocalStack on the host at %s", endpoint)  # the install says so when it installs
    venv = localstack_venv(cache_dir)
    root = Path(tempfile.mkdtemp(prefix="sqs-poller-localstack-"))
    cleanup: list[Callable[[], object]] = [remove_tree(root)]
    env = clean_env({
        **_localstack_env(port, wanted),
        # Outside a container: no DNS server, no certificate download, state in a temp dir of ours.
        "GATEWAY_LISTEN": f"{HOST}:{port}",
        "DNS_ADDRESS": "0",
        "SKIP_SSL_CERT_DOWNLOAD": "1",
        "OVERRIDE_IN_DOCKER": "0",
        "FILESYSTEM_ROOT": str(root),
    })
    launch = Launch(
        "localstack",
        (str(venv / "bin" / "python"), "-m", "localstack.runtime.main"),
        endpoint,
        log_file(log_dir, "localstack", port, cleanup),
        env,
        cwd=root,
    )
    return start_process(launch, lambda: _services_ready(endpoint, wanted), LOCALSTACK_START_TIMEOUT_S, cleanup)


def start_moto(*, port: int | None = None, log_dir: Path | None = None) -> Service:
    """moto's server (all AWS services) in a child process; needs ``moto[server]`` in this Python."""
    if importlib.util.find_spec("moto") is None:
        raise ServiceError("moto is not installed (pip install 'moto[server]')")
    port = port or free_port()
    endpoint = f"http://{HOST}:{port}"
    log.info("starting moto's server on %s", endpoint)
    cleanup: list[Callable[[], object]] = []
    launch = Launch(
        "moto",
        (sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)),
        endpoint,
        log_file(log_dir, "moto", port, cleanup),
        clean_env({}),
    )
    return start_process(launch, lambda: http_answers(f"{endpoint}/moto-api/"), MOTO_START_TIMEOUT_S, cleanup)
