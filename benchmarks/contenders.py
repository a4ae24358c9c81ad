"""How each of our own contenders is started: the real ``poller run`` CLI (a black box: flags,
environment, its documented health probes) and the boto3 loops of ``benchmarks.loops``.
mq-bridge's is in ``benchmarks.mqbridge``."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from benchmarks.contender import ContenderSpec, health_ready, log_ready
from poller.kit.process import free_port

__all__ = [
    "CREDENTIALS",
    "LOOP_LABELS",
    "HttpTarget",
    "KafkaTarget",
    "PollerOptions",
    "loop_spec",
    "poller_label",
    "poller_spec",
]

REGION = "us-east-1"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_REGION": REGION,
    "AWS_DEFAULT_REGION": REGION,
}


@dataclass(frozen=True, slots=True)
class HttpTarget:
    sink: str


@dataclass(frozen=True, slots=True)
class KafkaTarget:
    bootstrap: str
    topic: str


@dataclass(frozen=True, slots=True)
class PollerOptions:
    """What a case sets; everything else is the poller's default."""

    processes: int | None = None          # None: the poller's default (its CPU count)
    extra: tuple[str, ...] = field(default_factory=tuple)  # e.g. ("--http-concurrency", "16")


def poller_label(processes: int | None, suffix: str = "") -> str:
    base = "poller defaults" if processes is None else f"poller p{processes}"
    return f"{base}{suffix}"


def poller_spec(endpoint: str, queue_url: str, target: HttpTarget | KafkaTarget, *,
                options: PollerOptions = PollerOptions(), label: str | None = None,
                common: Sequence[str] = ()) -> ContenderSpec:
    """``python -m poller run`` with the queue, the endpoint, the channel and ``options`` only.

    ``--health-port`` is added to know when it is ready (its documented probes); it does not
    change how messages flow. ``common`` is ``--poller-arg`` from the command line (every case).
    """
    health = free_port()
    argv = [sys.executable, "-m", "poller", "run", "--queue-url", queue_url, "--endpoint-url", endpoint,
            "--region", REGION, "--health-port", str(health)]
    if isinstance(target, HttpTarget):
        argv += ["--channel", "http", "--sink", target.sink]
    else:
        argv += ["--channel", "kafka", "--kafka-bootstrap-servers", target.bootstrap, "--kafka-topic", target.topic]
    if options.processes is not None:
        argv += ["--processes", str(options.processes)]
    argv += [*options.extra, *common]
    return ContenderSpec(
        label=label or poller_label(options.processes), family="poller", argv=tuple(argv),
        ready=health_ready(health, options.processes), env=CREDENTIALS,
        settings={"processes": options.processes or "default", "args": " ".join([*options.extra, *common])},
    )


LOOP_LABELS = {"ceiling": "boto3 ceiling", "naive": "naive loop", "good": "good boto3 loop"}


def loop_spec(kind: str, endpoint: str, queue_url: str, *, sink: str | None = None, threads: int = 8) -> ContenderSpec:
    argv = [sys.executable, "-m", "benchmarks.loops", kind, "--endpoint-url", endpoint, "--queue-url", queue_url,
            "--threads", str(threads)]
    if sink is not None:
        argv += ["--sink", sink]
    return ContenderSpec(
        label=LOOP_LABELS[kind], family=kind, argv=tuple(argv), ready=log_ready("ready: "), env=CREDENTIALS,
        settings={"threads": 1 if kind == "naive" else threads},
    )
