"""Fault suite: what operations see. Credentials in a DEBUG log (IRSA), a secret in the sink URL's
path, a flooded health port, and a worker that crash-loops under a liveness probe.

Real LocalStack SQS -> the real ``poller run`` (supervisor, 2 workers) -> a dumper sink. Each case
sends numbered messages, starts the poller, injects its fault while the messages flow, and counts
what the sink really received (lost = 0), plus its own assertion.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from poller.metrics import HEAD_TIMEOUT
from support import (
    JWT, SECRET_KEY, SESSION_TOKEN, STATIC_CREDENTIALS, FakeSts, FaultCase, PollerProcess, SinkDeliveries,
    closed_by_server, connection_flood, dumper_sink, http_get, threads_of, wait_empty, free_port, send_messages, tally, wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults]





def test_debug_log_with_irsa_credentials(
    sqs: Any, make_queue: Any, aws_env: dict[str, str], start_poller: Callable[..., PollerProcess],
    fault_case: Callable[..., FaultCase], tmp_path: Path,
) -> None:
    """--log-level DEBUG with IRSA's environment (a web-identity JWT, a fake STS answering with a
    secret key and session token) and botocore and urllib3 asked for by name: botocore logs the
    AssumeRoleWithWebIdentity request and answer, and none of the three values reaches the log."""
    case = fault_case("DEBUG log with IRSA credentials", "http", max_duplicates=0)
    queue = make_queue(visibility_timeout=30)
    sts = FakeSts()
    try:
        env = {k: v for k, v in aws_env.items() if k not in STATIC_CREDENTIALS}
        env |= sts.environment(tmp_path / "token") | {"POLLER_DEBUG_LOGGERS": "botocore,urllib3"}
        with dumper_sink() as server:
            deliveries = SinkDeliveries(server)
            ids = send_messages(sqs, queue.url, [f"irsa-{i}" for i in range(200)])
            case.count_with(lambda wait: tally(sqs, ids, deliveries, wait=wait))
            poller = start_poller(queue.url, deliveries.poller_args(), "--log-level", "DEBUG",
                                  env=env, unset=STATIC_CREDENTIALS)
            wait_empty(sqs, queue.url)
            assert poller.stop() == 0, poller.log_text()[-3000:]
    finally:
        sts.close()
    log = poller.log_text()
    case.note(f"STS answered {sts.calls} AssumeRoleWithWebIdentity calls; {len(log.splitlines())} log lines")
    for name, secret in (("the JWT", JWT), ("the secret key", SECRET_KEY), ("the session token", SESSION_TOKEN)):
        assert secret not in log, f"{name} is in the poller's log"
    assert sts.calls >= 3, "the supervisor and both workers should have assumed the role"
    assert "AssumeRoleWithWebIdentity" in log and "<SessionToken>***</SessionToken>" in log, log[-3000:]
    case.finish()


def test_secret_in_the_sink_path(
    sqs: Any, make_queue: Any, start_poller: Callable[..., PollerProcess], fault_case: Callable[..., FaultCase],
) -> None:
    """A webhook-style sink URL with its secret in the path; the sink answers 500 (retried) or 400
    (rejected, back after the 2 s visibility timeout) to the first attempt of some messages, so
    reasons naming the sink are logged. At DEBUG, no line shows the secret segments."""
    case = fault_case("secret in the sink URL's path", "http", max_duplicates=0)
    queue = make_queue(visibility_timeout=2)
    secrets = ("T0SECRETTEAM", "B0SECRETHOOK", "x8Kq2vN7pLs9SecretPart")
    seen: set[str] = set()
    lock = threading.Lock()

    def first_attempt_fails(event: dict[str, Any], headers: Any) -> int | None:
        with lock:
            first = event["id"] not in seen
            seen.add(event["id"])
        roll = hashlib.sha256(event["id"].encode()).digest()[0] % 8
        return (500 if roll < 2 else 400 if roll == 2 else None) if first else None

    with dumper_sink(respond=first_attempt_fails) as server:
        deliveries = SinkDeliveries(server, server.url + "services/" + "/".join(secrets))
        ids = send_messages(sqs, queue.url, [f"webhook-{i}" for i in range(100)])
        case.count_with(lambda wait: tally(sqs, ids, deliveries, wait=wait))
        poller = start_poller(queue.url, deliveries.poller_args(), "--log-level", "DEBUG",
                              "--nack-backoff", "0")
        wait_empty(sqs, queue.url)
        assert poller.stop() == 0, poller.log_text()[-3000:]
    log = poller.log_text()
    case.note(f"sink refused {server.counts.refused} requests")
    for secret in secrets:
        assert secret not in log, f"{secret} is in the poller's log"
    assert "services/***/***/***" in log, log[-3000:]
    assert "answered HTTP 500" in log and "answered HTTP 400" in log, "no retry or reject reason was logged"
    case.finish()


def test_health_port_flooded(
    sqs: Any, make_queue: Any, start_poller: Callable[..., PollerProcess], fault_case: Callable[..., FaultCase],
) -> None:
    """400 idle connections and 5 slowloris ones on the metrics port while messages flow: /healthz
    and /metrics answer within a second, the supervisor starts no thread for them, and every one of
    them is closed within the request-head deadline."""
    case = fault_case("health port flooded (400 idle + 5 slowloris)", "http", max_duplicates=0)
    queue = make_queue(visibility_timeout=30)
    port = free_port()
    with dumper_sink() as server:
        deliveries = SinkDeliveries(server)
        ids = send_messages(sqs, queue.url, [f"flood-{i}" for i in range(300)])
        case.count_with(lambda wait: tally(sqs, ids, deliveries, wait=wait))
        poller = start_poller(queue.url, deliveries.poller_args(), "--metrics-port", str(port),
                              "--max-rate", "100")
        wait_until(lambda: http_get(port, "/readyz")[0] == 200, 30, "the poller to be ready")
        before = threads_of(poller.pid)
        with connection_flood(port, "/metrics") as flood:
            answers = []
            for _ in range(5):
                answers.append(http_get(port, "/healthz"))
                time.sleep(0.2)
            answers.append(http_get(port, "/metrics"))
            during = threads_of(poller.pid)
            assert all(status == 200 and seconds < 1.0 for status, _, seconds in answers), answers
            assert during <= before, f"the supervisor went from {before} to {during} threads"
            deadline = time.monotonic() + HEAD_TIMEOUT + 2.0
            still_open = sum(not closed_by_server(s, max(0.01, deadline - time.monotonic())) for s in flood)
            assert not still_open, f"{still_open} connections still open {HEAD_TIMEOUT + 2:g}s after the flood"
        case.note(f"slowest probe {max(seconds for _, _, seconds in answers) * 1000:.0f} ms; "
                  f"supervisor threads {before} -> {during}")
        wait_empty(sqs, queue.url)
        assert poller.stop() == 0, poller.log_text()[-3000:]
    case.finish()


def test_one_worker_crash_loops(
    sqs: Any, make_queue: Any, start_poller: Callable[..., PollerProcess], fault_case: Callable[..., FaultCase],
) -> None:
    """Worker slot 0 is SIGKILLed again and again (each replacement as soon as it appears) for 5 s
    and three kills at least, while the other worker delivers: /healthz and /readyz stay 200 all
    along (the liveness probe must not restart a pod whose other worker works). Duplicates <= 70:
    what the first victim held (--max-in-flight 50) plus a delete batch per deleter."""
    case = fault_case("one worker crash-looping under /healthz", "http", max_duplicates=70)
    queue = make_queue(visibility_timeout=3)
    port = free_port()
    with dumper_sink() as server:
        deliveries = SinkDeliveries(server)
        ids = send_messages(sqs, queue.url, [f"crashloop-{i}" for i in range(250)])
        case.count_with(lambda wait: tally(sqs, ids, deliveries, wait=wait))
        poller = start_poller(queue.url, deliveries.poller_args(), "--health-port", str(port),
                              "--max-in-flight", "50", "--max-rate", "50")
        survivor = poller.wait_for_workers(2)[1]
        wait_until(lambda: http_get(port, "/readyz")[0] == 200, 30, "the poller to be ready")
        kills = 0
        probes: list[tuple[int, str, str]] = []
        delivered_before = len(server.events)
        started = time.monotonic()
        while time.monotonic() - started < 5.0 or (kills < 3 and time.monotonic() - started < 12.0):
            for pid in poller.worker_pids():
                if pid != survivor:
                    try:
                        os.kill(pid, signal.SIGKILL)
                        kills += 1
                    except ProcessLookupError:
                        pass
            (health, body, _), ready = http_get(port, "/healthz"), http_get(port, "/readyz")[0]
            probes.append((health, body.strip(), str(ready)))
            time.sleep(0.1)
        assert survivor in poller.worker_pids(), "the survivor died"
        delivered_during = len(server.events)
        wait_empty(sqs, queue.url)
        assert poller.stop() == 0, poller.log_text()[-3000:]
    case.note(f"{kills} kills; {len(probes)} probes; {delivered_during - delivered_before} delivered during the kills")
    assert kills >= 3, f"only {kills} kills: the slot did not crash-loop"
    assert delivered_during > delivered_before, "the other worker delivered nothing during the kills"
    assert any("worker-0 is not running" in body or "worker-1 is not running" in body for _, body, _ in probes)
    failed = [p for p in probes if p[0] != 200 or p[2] != "200"]
    assert not failed, f"{len(failed)} of {len(probes)} probes failed: {failed[:3]}"
    case.finish()
