"""``--processes auto`` end to end: real LocalStack SQS -> the supervisor with real workers -> an
HTTP sink (our message dumper). A worker is added under a backlog and retired (the usual
graceful stop) when it is not needed, and nothing is lost: every message reached the sink and
the queue is empty, nothing left invisible.

The supervisor runs in its own process (it installs signal handlers) with the policy's thresholds
lowered: a worker here drains LocalStack at a fifth of a core, never the 0.85 that saturates it,
and the test must not wait the production keepalive. What is tested is the supervisor's side:
the workers' numbers reach the policy, and adding and retiring keep at-least-once.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from support import (
    PollerProcess,
    dumper_sink,
    queue_counts,
    send_messages,
    send_parallel,
    split,
    wait_empty,
    wait_until,
)

pytestmark = pytest.mark.integration

TESTS = str(Path(__file__).parent)
REPO = str(Path(__file__).parent.parent)
MESSAGES = 10_000


def serve(queue_url: str, endpoint: str, sink: str, case: str) -> int:
    """The supervisor's process: two slots, --processes auto, the case's policy and in-flight."""
    from channels.http import HttpConfig
    from poller.autoscale import Policy
    from poller.config import RunConfig, WorkerConfig
    from poller.logs import setup_logging
    from poller.sqs import SqsTarget
    from poller.supervisor import Supervisor

    setup_logging("INFO")
    worker = WorkerConfig(target=SqsTarget(queue_url=queue_url, region="us-east-1", endpoint_url=endpoint),
                          channel=HttpConfig(sink=sink), wait_time=1, shutdown_timeout=15,
                          max_in_flight=CASES[case]["max_in_flight"])
    config = RunConfig(worker=worker, processes=2, autoscale=True, shutdown_timeout=20, stats_interval=2)
    return Supervisor(config, autoscale=Policy(**CASES[case]["policy"])).run()


QUICK = {"window": 1.0, "sustain": 1.0, "keepalive": 3.0, "spare": 0.0}
CASES: dict[str, dict[str, Any]] = {
    # A fast sink. Busy at a tenth of a core (a worker draining LocalStack), fitting at a twentieth
    # (idle long polls); the trial always passes: the worker stays while the backlog lasts, and is
    # retired once idle.
    "idle": {"policy": {**QUICK, "busy": 0.1, "fits": 0.05, "trial": 3.0, "gain": 0.0},
             "max_in_flight": 100, "sink_delay": 0.0},
    # A sink answering in 20 ms and 20 messages in flight per worker: the backlog lasts, and each
    # worker holds messages when it is retired. The trial always fails: the worker is retired in
    # the middle of the backlog, and added again after a second.
    "churn": {"policy": {**QUICK, "busy": 0.02, "fits": 0.005, "trial": 2.0, "gain": 100.0, "retry_after": 1.0,
                         "retry_max": 1.0},
              "max_in_flight": 20, "sink_delay": 0.02},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_worker_is_added_under_a_backlog_and_retired_with_nothing_lost(
    case: str, sqs: Any, make_queue: Any, sqs_endpoint: str, aws_env: Mapping[str, str], tmp_path: Path
) -> None:
    queue = make_queue(visibility_timeout=60)
    ids = [m for chunk in send_parallel(sqs, queue.url, split([f"m{i}" for i in range(MESSAGES)], 4))
           for m in chunk]
    log_path = tmp_path / "supervisor.log"
    code = (f"import sys; sys.path[:0] = [{TESTS!r}, {REPO!r}]; from test_autoscale_e2e import serve; "
            f"sys.exit(serve(*sys.argv[1:]))")
    delay = CASES[case]["sink_delay"]

    def respond(event: dict[str, Any], headers: Any) -> None:
        time.sleep(delay)

    with dumper_sink(respond=respond if delay else None) as server, open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, queue.url, sqs_endpoint, server.url, case],
            env={**os.environ, **aws_env}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            def log() -> str:
                return log_path.read_text(errors="replace")

            wait_until(lambda: "autoscale: adding worker-1" in log(), 60, "a worker added under the backlog")
            if case == "idle":
                wait_until(lambda: "retired: stopped" in log(), 90, "the added worker retired once idle")
                assert "the load fits in 1 worker(s)" in log()
            else:
                wait_until(lambda: "retired: stopped" in log(), 90, "a retirement under load")
                assert "did not raise the rate" in log()

                def retired_holding() -> bool:  # the churn retires worker-1 again and again: one held some
                    return any(int(n) for n in re.findall(r"\[worker-1\] stopping: (\d+) message\(s\) held", log()))

                wait_until(retired_holding, 60, "a retirement of a worker holding messages (under load)")
            wait_until(lambda: len({e["id"] for e in server.events}) >= len(ids), 120, "every message delivered")
        finally:
            if proc.poll() is None:
                proc.terminate()
            exit_code = proc.wait(40)
        delivered = [e["id"] for e in server.events]
    text = log_path.read_text(errors="replace")
    assert exit_code == 0, text[-3000:]
    lost = set(ids) - set(delivered)
    assert not lost, f"{len(lost)} lost:\n{text[-3000:]}"
    wait_empty(sqs, queue.url, 30)
    retired = text.count("retired: stopped")
    print(f"\n{case}: {len(ids)} messages, {len(delivered)} deliveries "
          f"({len(delivered) - len(set(delivered))} duplicates), {text.count('autoscale: adding')} added, "
          f"{retired} retired")
    assert "worker_restarts" not in text and "restarting in" not in text, text[-3000:]


def test_the_cli_default_is_auto_and_batch_mode_ends_with_one_worker(
    sqs: Any, make_queue: Any, aws_env: Mapping[str, str], tmp_path: Path
) -> None:
    """`poller run` without --processes: auto, one worker started (the others wait for a load that
    saturates it), and --until-empty ends the run once that worker is drained."""
    queue = make_queue()
    ids = send_messages(sqs, queue.url, [f"b{i}" for i in range(300)])
    with dumper_sink() as server:
        poller = PollerProcess(["--queue-url", queue.url, "--sink", server.url, "--max-processes", "2",
                                "--wait-time", "1", "--until-empty"], aws_env, tmp_path / "poller.log")
        try:
            code = poller.proc.wait(90)
        finally:
            poller.stop()
        delivered = {e["id"] for e in server.events}
    log = poller.log_text()
    assert code == 0, log[-3000:]
    assert "worker processes: auto, 1 to 2 (--max-processes)" in log
    assert "with auto, 1 to 2 process(es)" in log
    assert "--max-processes is for --processes auto" not in log
    assert "started worker-0" in log and "started worker-1" not in log, log[-3000:]
    assert "the queue is empty" in log
    assert delivered == set(ids)
    assert queue_counts(sqs, queue.url) == (0, 0)
