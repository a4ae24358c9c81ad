"""Fault suite: the poller's own processes die or are told to stop, in the middle of a flow.

Real LocalStack SQS -> the real ``poller run`` (supervisor, 2 workers) -> a dumper sink or a tansu
topic. Each case sends numbered messages first, starts the poller, injects its fault once the flow
is under way, waits for the flow to end, then counts what the channel really received.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

from support import (
    Deliveries, FaultCase, PollerProcess, pid_alive, queue_counts, send_parallel, split, tally, wait_empty, wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults]

MAX_IN_FLIGHT = 50
SHUTDOWN_TIMEOUT_S = 20  # --shutdown-timeout of the suite's BASE_ARGS


def remaining(sqs: Any, url: str) -> int:
    return sum(queue_counts(sqs, url))


def send_numbered(sqs: Any, url: str, n: int, prefix: str) -> list[str]:
    return [mid for chunk in send_parallel(sqs, url, split([f"{prefix}-{i}" for i in range(n)], 8)) for mid in chunk]


def wait_for_flow(sqs: Any, url: str, n: int, taken: int) -> int:
    """Wait until ``taken`` of ``n`` messages left the queue; the number still on it (must be > 0)."""
    wait_until(lambda: remaining(sqs, url) <= n - taken, 120, f"{taken} messages delivered", interval=0.05)
    left = remaining(sqs, url)
    assert left > 0, "the queue emptied before the fault: send more"
    return left


def test_sigkill_of_a_worker(
    sqs: Any, make_queue: Any, deliveries: Deliveries, start_poller: Callable[..., PollerProcess],
    fault_case: Callable[..., FaultCase],
) -> None:
    """SIGKILL of one of the two workers mid-flow: the supervisor replaces it, and what it held
    comes back after the 5 s visibility timeout. Duplicates <= 70: what the killed worker held
    (--max-in-flight 50, delivered and not yet deleted) plus a delete batch per deleter (2 x 10)."""
    case = fault_case("SIGKILL of a worker", deliveries.channel, max_duplicates=70)
    n = 1500
    queue = make_queue(visibility_timeout=5)
    ids = send_numbered(sqs, queue.url, n, "kill-worker")
    case.count_with(lambda wait: tally(sqs, ids, deliveries, wait=wait))
    poller = start_poller(queue.url, deliveries.poller_args(), "--max-in-flight", str(MAX_IN_FLIGHT))
    poller.wait_for_workers(2)
    wait_for_flow(sqs, queue.url, n, 200)
    victim = poller.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: victim not in poller.worker_pids() and len(poller.worker_pids()) == 2, 30,
               "the supervisor to replace the killed worker")
    wait_empty(sqs, queue.url, 120)
    assert poller.stop() == 0, poller.log_text()[-3000:]
    assert "was killed by SIGKILL" in poller.log_text()
    case.finish()


def test_sigkill_of_the_supervisor(
    sqs: Any, make_queue: Any, deliveries: Deliveries, start_poller: Callable[..., PollerProcess],
    fault_case: Callable[..., FaultCase],
) -> None:
    """SIGKILL of the supervisor mid-flow: its workers notice (they check their parent pid every
    second), stop and exit on their own; a new poller delivers the rest. One receiver and 20
    messages in flight per worker, so the flow outlasts that second. Duplicates <= 40: at worst
    what the two orphaned workers held (--max-in-flight 20 each)."""
    in_flight = 20
    case = fault_case("SIGKILL of the supervisor", deliveries.channel, max_duplicates=2 * in_flight)
    n = 3000
    queue = make_queue(visibility_timeout=5)
    ids = send_numbered(sqs, queue.url, n, "kill-supervisor")
    case.count_with(lambda wait: tally(sqs, ids, deliveries, wait=wait))
    slow_flow = ("--receivers", "1", "--max-in-flight", str(in_flight))
    first = start_poller(queue.url, deliveries.poller_args(), *slow_flow)
    workers = first.wait_for_workers(2)
    wait_for_flow(sqs, queue.url, n, 200)
    os.kill(first.pid, signal.SIGKILL)
    first.proc.wait()
    wait_until(lambda: not any(pid_alive(pid) for pid in workers), 40, "the orphaned workers to exit")
    assert "supervisor is gone" in first.log_text(), first.log_text()[-3000:]
    left = remaining(sqs, queue.url)
    case.note(f"{left} left for the second poller")
    assert left > 0, "the orphaned workers emptied the queue: nothing left for the new poller"
    second = start_poller(queue.url, deliveries.poller_args(), *slow_flow)
    second.wait_for_workers(2)
    wait_empty(sqs, queue.url, 120)
    assert second.stop() == 0, second.log_text()[-3000:]
    case.finish()


def test_sigterm_under_load(
    sqs: Any, make_queue: Any, deliveries: Deliveries, start_poller: Callable[..., PollerProcess],
    fault_case: Callable[..., FaultCase],
) -> None:
    """SIGTERM mid-flow: the poller exits 0 within its --shutdown-timeout (20 s, plus 2 s of
    slack), and every message is delivered or back on the queue (delivered + still queued = all).
    Duplicates <= 10 (one delete batch): a message delivered and still on the queue counts as one,
    and a graceful stop deletes what was delivered. On the HTTP channel none is both: every answer
    is in before the stop ends (a Kafka delivery report may still be out when it does)."""
    case = fault_case("SIGTERM under load", deliveries.channel, max_duplicates=10)
    n = 3000
    queue = make_queue(visibility_timeout=5)
    ids = send_numbered(sqs, queue.url, n, "sigterm")
    case.count_with(lambda wait: tally(sqs, ids, deliveries, wait=wait, drain_url=queue.url))
    poller = start_poller(queue.url, deliveries.poller_args())
    left = wait_for_flow(sqs, queue.url, n, 300)
    stopping = time.monotonic()
    code = poller.stop(timeout=40)
    took = time.monotonic() - stopping
    assert code == 0, poller.log_text()[-3000:]
    assert took < SHUTDOWN_TIMEOUT_S + 2, f"took {took:.1f} s for a {SHUTDOWN_TIMEOUT_S} s shutdown timeout"
    result = case.finish()
    case.note(f"{left} on the queue at SIGTERM, {len(result.queued)} back on it after; stopped in {took:.1f} s")
    assert result.queued, "nothing was left on the queue: the SIGTERM did not hit a flow"
    if deliveries.channel == "http":
        both = result.delivered.keys() & result.queued.keys()
        assert not both, f"{len(both)} delivered messages were not deleted at the stop: {sorted(both)[:5]}"
