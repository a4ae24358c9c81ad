"""Fault suite: SQS misbehaves. It fails every call for 10 s (500s, throttling, connection resets),
its deletes are slow, or the credentials cannot be refreshed for a while.

SQS faults go through tests/faultproxy.py in HTTP mode: the poller gets the proxy as its
``--endpoint-url`` (the queue URL stays LocalStack's), and the proxy answers canned SQS errors,
resets connections or holds ``DeleteMessageBatch`` calls. The credential fault is real: a profile
whose ``credential_process`` fails while a flag file exists, no mocks.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from faultproxy import SQS_INTERNAL_ERROR, SQS_THROTTLING, Fault, FaultProxy, HttpError, SlowActions
from support import (
    FaultCase, PollerProcess, SinkDeliveries, dumper_sink, send_messages, tally, wait_empty, wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults]



# 600 messages at 25 msg/s take ~24 s: the flow is still going when a 10 s fault ends (the
# sink's own pace does not bound it: the poller has 64 requests in flight per process).
PACED = ("--max-rate", "25")


def steady_sink(seconds: float = 0.03) -> Callable[[dict[str, Any], Any], None]:
    """A sink taking ``seconds`` per event: the flow lasts a few seconds, deliveries are in
    progress when the fault starts."""

    def respond(event: dict[str, Any], headers: Any) -> None:
        time.sleep(seconds)

    return respond


def test_sqs_failing_for_10s(
    sqs: Any, sqs_endpoint: str, make_queue: Any, start_poller: Callable[..., PollerProcess],
    fault_case: Callable[..., FaultCase],
) -> None:
    """For 10 s every SQS call fails, while deliveries are in progress: 500 InternalFailure for a
    third of it, then 400 RequestThrottled, then connection resets. Everything arrives after.
    Duplicates: 0 (the 30 s visibility timeout outlasts the outage: a delivered message's delete is
    retried until SQS takes it, and a receive whose answer was lost delivered nothing)."""
    case = fault_case("SQS 500 / throttling / resets 10 s", "http", max_duplicates=0)
    queue = make_queue(visibility_timeout=30)
    with dumper_sink(respond=steady_sink()) as server, FaultProxy(sqs_endpoint, http=True, seed=10) as proxy:
        deliveries = SinkDeliveries(server)
        ids = send_messages(sqs, queue.url, [f"sqs-down-{i}" for i in range(600)])
        case.count_with(lambda wait: tally(sqs, ids, deliveries, wait=wait))
        poller = start_poller(queue.url, deliveries.poller_args(), "--endpoint-url", proxy.url, *PACED)
        wait_until(lambda: len(server.received) >= 100, 60, "the flow to start")
        for fault in (HttpError(SQS_INTERNAL_ERROR), HttpError(SQS_THROTTLING), Fault.RESET):
            proxy.set(fault)
            time.sleep(10 / 3)  # the fault's share of the outage
        proxy.clear()
        stats = proxy.stats()
        case.note(f"canned {sum(stats.canned.values())} answers, reset {stats.resets} connections")
        assert len({e["id"] for e in server.events}) < len(ids), "everything was delivered before the outage"
        assert sum(stats.canned.values()) > 0 and stats.resets > 0, "the faults did not hit the poller's calls"
        wait_empty(sqs, queue.url, 150)
        assert poller.stop() == 0, poller.log_text()[-3000:]
    case.finish()


def test_slow_deletes(
    sqs: Any, sqs_endpoint: str, make_queue: Any, start_poller: Callable[..., PollerProcess],
    fault_case: Callable[..., FaultCase],
) -> None:
    """Every DeleteMessageBatch is held 1 s before SQS gets it; visibility timeout 10 s, 1,000
    messages, a fast sink. A delivered message whose delete is still pending must not be handed out
    again: duplicates <= 20 (2%)."""
    n = 1000
    case = fault_case("DeleteMessageBatch 1 s slow", "http", max_duplicates=n // 50)
    queue = make_queue(visibility_timeout=10)
    with dumper_sink() as server, FaultProxy(sqs_endpoint, http=True) as proxy:
        proxy.set(SlowActions(frozenset({"DeleteMessageBatch"}), 1.0))
        deliveries = SinkDeliveries(server)
        ids = send_messages(sqs, queue.url, [f"slow-delete-{i}" for i in range(n)])
        case.count_with(lambda wait: tally(sqs, ids, deliveries, wait=wait))
        poller = start_poller(queue.url, deliveries.poller_args(), "--endpoint-url", proxy.url)
        wait_empty(sqs, queue.url, 180)
        assert poller.stop() == 0, poller.log_text()[-3000:]
        case.note(f"{proxy.stats().slowed['DeleteMessageBatch']} deletes held")
    case.finish()


# -- credentials ----------------------------------------------------------------------------------------

_CREDENTIAL_PROCESS = """\
#!/bin/sh
# credential_process of the fault suite: fails while the flag file exists.
echo call >> {calls}
if [ -e {flag} ]; then
    echo "credential refresh failing on purpose (fault suite)" >&2
    echo fail >> {failures}
    exit 1
fi
# Expiring within botocore's 10-minute mandatory refresh window: every use refreshes.
printf '{{"Version": 1, "AccessKeyId": "test", "SecretAccessKey": "test", "Expiration": "%s"}}\\n' \\
    "$(date -u -d '+5 minutes' +%Y-%m-%dT%H:%M:%SZ)"
"""
_AWS_UNSET = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
              "AWS_DEFAULT_PROFILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
              "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN")


def credential_profile(root: Path) -> tuple[dict[str, str], Path, Path, Path]:
    """An AWS config with profile ``faulty``; (env for the poller, flag file, calls log, failures log)."""
    root.mkdir()
    flag, calls, failures = root / "refresh-fails", root / "calls", root / "failures"
    script = root / "credentials.sh"
    script.write_text(_CREDENTIAL_PROCESS.format(
        calls=shlex.quote(str(calls)), flag=shlex.quote(str(flag)), failures=shlex.quote(str(failures))))
    script.chmod(0o755)
    config = root / "config"
    config.write_text(f"[profile faulty]\nregion = us-east-1\ncredential_process = /bin/sh {script}\n")
    env = {
        "AWS_CONFIG_FILE": str(config),
        "AWS_SHARED_CREDENTIALS_FILE": str(root / "no-credentials-file"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    return env, flag, calls, failures


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_failing_credential_refresh(
    sqs: Any, sqs_endpoint: str, make_queue: Any, start_poller: Callable[..., PollerProcess],
    fault_case: Callable[..., FaultCase], tmp_path: Path,
) -> None:
    """The poller runs with --profile whose credential_process refreshes on every use, and no
    AWS keys in its environment; mid-run the refresh fails for 10 s (the process exits 1). Every
    message arrives. Duplicates: 0 (the 30 s visibility timeout outlasts the failure: deletes of
    delivered messages must wait for the credentials, not be dropped)."""
    case = fault_case("credential refresh failing 10 s", "http", max_duplicates=0)
    queue = make_queue(visibility_timeout=30)
    env, flag, calls, failures = credential_profile(tmp_path / "aws")
    with dumper_sink(respond=steady_sink()) as server:
        deliveries = SinkDeliveries(server)
        ids = send_messages(sqs, queue.url, [f"credentials-{i}" for i in range(600)])
        case.count_with(lambda wait: tally(sqs, ids, deliveries, wait=wait))
        poller = start_poller(queue.url, deliveries.poller_args(), "--profile", "faulty", "--endpoint-url",
                              sqs_endpoint, *PACED, env=env, unset=_AWS_UNSET)
        wait_until(lambda: len(server.received) >= 100, 60, "the flow to start")
        calls_before = lines(calls)
        flag.touch()
        time.sleep(10)  # the failure's duration
        flag.unlink()
        assert len({e["id"] for e in server.events}) < len(ids), "everything was delivered before the failure"
        assert lines(failures) > 0, "the poller did not refresh its credentials during the failure"
        wait_empty(sqs, queue.url, 150)
        assert poller.stop() == 0, poller.log_text()[-3000:]
    case.note(f"credential_process ran {lines(calls)} times ({lines(calls) - calls_before} after the flow began), "
              f"failed {lines(failures)} times")
    case.finish()

