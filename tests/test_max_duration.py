"""``poller run --max-duration``: a run that reaches it stops as on SIGTERM and exits 0.

End to end: real LocalStack SQS -> the real ``poller run`` -> a slow HTTP sink (our message
dumper), in batch mode as the CronJob runs it, with more messages than the run can deliver in
its time. The poller must exit by itself, 0, within --max-duration plus its shutdown time;
and nothing may be lost: every message was delivered and deleted, or is back on the queue
(visible at once, not left to its visibility timeout), never both.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from poller.kit.dumper import DumperServer

from support import PollerProcess, drain, queue_counts, send_messages, wait_until

pytestmark = pytest.mark.integration

MAX_DURATION = 5
SHUTDOWN_TIMEOUT = 10
VISIBILITY_TIMEOUT = 120  # far above the test: a message not given back would stay invisible
STARTUP = 30  # seconds the start check and the workers' boot may take on a busy machine


def test_max_duration_ends_a_batch_run_cleanly_with_nothing_lost(
    sqs: Any, make_queue: Any, aws_env: Mapping[str, str], tmp_path: Path
) -> None:
    queue = make_queue(visibility_timeout=VISIBILITY_TIMEOUT)
    ids = send_messages(sqs, queue.url, [f"m{i}" for i in range(500)])

    def slow(event: dict[str, Any], headers: Any) -> None:
        time.sleep(0.2)  # ~50 events/s with 10 in flight: the queue outlasts the run

    args = [
        "--queue-url", queue.url, "--processes", "1", "--receivers", "1", "--max-in-flight", "10",
        "--wait-time", "1", "--stats-interval", "2", "--shutdown-timeout", str(SHUTDOWN_TIMEOUT),
        "--until-empty", "--max-duration", str(MAX_DURATION),
    ]
    with open(os.devnull, "w") as devnull, \
            DumperServer("127.0.0.1", 0, out=devnull, keep=True, respond=slow) as server:
        started = time.monotonic()
        poller = PollerProcess([*args, "--sink", server.url], aws_env, tmp_path / "poller.log")
        try:
            poller.wait_for_workers(1, timeout=STARTUP)
            running = time.monotonic()
            code = poller.proc.wait(MAX_DURATION + SHUTDOWN_TIMEOUT + 5)  # no signal: it ends by itself
            ended = time.monotonic()
        finally:
            poller.stop()
        delivered = [e["id"] for e in server.events]
    log = poller.log_text()
    assert code == 0, log[-3000:]
    assert "--max-duration reached" in log, log[-3000:]
    assert ended - started >= MAX_DURATION, f"exited after {ended - started:.1f}s, before --max-duration"
    assert ended - running <= MAX_DURATION + SHUTDOWN_TIMEOUT, \
        f"exited {ended - running:.1f}s after the workers started: more than --max-duration + --shutdown-timeout"
    assert 0 < len(delivered) < len(ids), f"{len(delivered)} of {len(ids)} delivered: the run was not cut short"

    # What was not delivered was given back: visible again at once, not after the visibility timeout.
    wait_until(lambda: queue_counts(sqs, queue.url)[1] == 0, 15, "no message left invisible")
    remaining = [m["MessageId"] for m in drain(sqs, queue.url)]
    print(f"\n--max-duration {MAX_DURATION}: exit 0 {ended - running:.1f}s after the workers started, "
          f"{len(delivered)} delivered, {len(remaining)} back on the queue")
    assert len(set(delivered)) == len(delivered), "a message was delivered twice"
    assert not set(delivered) & set(remaining), "a delivered message was not deleted"
    assert set(delivered) | set(remaining) == set(ids), "messages lost"
