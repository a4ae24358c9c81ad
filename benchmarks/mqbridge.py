"""mq-bridge, the peer: a Rust bridge users ``pip install``, each wheel in its own cached venv.

- ``mq-bridge-basic`` 1.2.0 (HTTP, AWS, ...): the ``aws`` (SQS) input -> ``http`` output rows;
- ``mq-bridge`` 1.2.0 (the full wheel, with Kafka): the ``aws`` input -> ``kafka`` output row.

Both install the same import path (``mq_bridge``), hence one venv each, under
``~/.cache/sqs-poller/bench/`` (``SQS_POLLER_BENCH_CACHE`` moves it), installed on first use
(one log line says so) and reused after. The route runs in ``mqbridge_route.py`` with the venv's
Python. Its settings are mq-bridge's defaults; only where to read and where to write are given.
What the ``http`` output sends: a ``POST`` of the raw SQS body, message attributes as headers
(no CloudEvent: less work than the poller does per message).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.contender import ContenderSpec, log_ready

__all__ = ["BASIC", "FULL", "MqBridge", "ensure_installed", "http_route", "kafka_route", "spec"]

log = logging.getLogger(__name__)

ROUTE_SCRIPT = Path(__file__).resolve().with_name("mqbridge_route.py")
INSTALL_TIMEOUT_S = 600
# pip's own per-connection timeout and retries: an unreachable PyPI fails in about a minute.
PIP_NETWORK = ("--timeout", "20", "--retries", "2", "--disable-pip-version-check")


@dataclass(frozen=True, slots=True)
class MqBridge:
    package: str   # the PyPI distribution
    version: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


BASIC = MqBridge("mq-bridge-basic", "1.2.0")
FULL = MqBridge("mq-bridge", "1.2.0")


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "sqs-poller" / "bench"
    return Path(os.environ.get("SQS_POLLER_BENCH_CACHE", default))


def ensure_installed(bridge: MqBridge) -> Path:
    """The Python of ``bridge``'s venv, installing it from PyPI first if needed (a file lock keeps two
    runs apart). Raises ``RuntimeError`` (one line, naming the install log) if that fails."""
    venv = cache_dir() / f"{bridge.package}-{bridge.version}"
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists() and python.exists():
            return python
        log.info("installing %s into %s (first use, ~10-30 s; cached after)", bridge.requirement, venv)
        install_log = venv.parent / f"{venv.name}-install.log"
        with open(install_log, "wb") as out:
            for argv in ([sys.executable, "-m", "venv", "--clear", str(venv)],
                         [str(python), "-m", "pip", "install", "--quiet", *PIP_NETWORK, bridge.requirement]):
                try:
                    code = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT,
                                          timeout=INSTALL_TIMEOUT_S).returncode
                except subprocess.TimeoutExpired:
                    code = -1
                if code != 0:
                    raise RuntimeError(f"pip could not install {bridge.requirement} (PyPI unreachable?); "
                                       f"see {install_log}")
        stamp.write_text(bridge.requirement + "\n")
    return python


def _aws_input(queue_url: str, endpoint: str, region: str) -> dict[str, Any]:
    return {"aws": {"queue_url": queue_url, "endpoint_url": endpoint, "region": region,
                    "access_key": "test", "secret_key": "test"}}


def http_route(queue_url: str, endpoint: str, region: str, sink: str) -> dict[str, Any]:
    return {"input": _aws_input(queue_url, endpoint, region), "output": {"http": {"url": sink}}}


def kafka_route(queue_url: str, endpoint: str, region: str, bootstrap: str, topic: str) -> dict[str, Any]:
    return {"input": _aws_input(queue_url, endpoint, region),
            "output": {"kafka": {"url": bootstrap, "topic": topic}}}


def spec(bridge: MqBridge, python: Path, route: dict[str, Any], config_path: Path, *,
         label: str = "mq-bridge") -> ContenderSpec:
    """The contender: the route script under ``python``, the bridge's venv (``ensure_installed``)."""
    config_path.write_text(json.dumps(route, indent=2))
    return ContenderSpec(
        label=label, family="mq-bridge", argv=(str(python), str(ROUTE_SCRIPT), str(config_path)),
        ready=log_ready("ready: mq-bridge"),
        env={"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_EC2_METADATA_DISABLED": "true"},
        settings={"package": bridge.requirement, "route": "defaults (only input and output given)"},
    )
