"""End to end: real LocalStack SQS -> the real ``poller run`` (processes, supervisor) -> a real HTTP sink.

Nothing is faked: the sink is our message dumper on 127.0.0.1 (its ``respond`` hook plays a slow,
failing or dead sink), and every event it accepted is parsed by the cloudevents SDK.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from cloudevents.core.bindings.http import HTTPMessage, from_http_event

from channels.http import REFUSAL_RUN
from poller.kit.dumper import DumperServer
from support import (
    PollerProcess, drain, free_port, http_get, make_body, metric_samples, metrics_by_key, queue_counts, send_messages,
    wait_empty, wait_until,
)

pytestmark = pytest.mark.integration



@contextmanager
def sink(**kwargs: Any) -> Iterator[DumperServer]:
    with open(os.devnull, "w") as devnull, DumperServer("127.0.0.1", 0, out=devnull, keep=True, **kwargs) as server:
        yield server


def poller_args(queue_url: str, sink_url: str, *extra: str) -> list[str]:
    return [
        "--queue-url", queue_url, "--sink", sink_url, "--processes", "2", "--wait-time", "1",
        "--stats-interval", "2", "--shutdown-timeout", "20", *extra,
    ]


def accepted_ids(server: DumperServer) -> list[str]:
    return [e["id"] for e in server.events]




def test_5000_mixed_messages_arrive_once_and_queue_ends_empty(
    sqs: Any, make_queue: Any, aws_env: dict[str, str], tmp_path: Path
) -> None:
    queue = make_queue(visibility_timeout=60)
    rng = random.Random(5000)
    # 1 B to 200 KB, most of them small (log-uniform), a few at the top.
    sizes = [1, 2, 3] + [200 * 1024] * 5 + [int(10 ** rng.uniform(0, 4.3)) for _ in range(4992)]
    rng.shuffle(sizes)
    entries = []
    for i, size in enumerate(sizes):
        entry: dict[str, Any] = {"MessageBody": make_body(size)}
        if i % 2:
            entry["MessageAttributes"] = {
                "trace": {"DataType": "String", "StringValue": f"t-{i} ü"},
                "amount": {"DataType": "Number", "StringValue": str(i)},
                "Blob": {"DataType": "Binary", "BinaryValue": bytes([i % 256]) * 3},
            }
        entries.append(entry)

    with sink() as server:
        poller = PollerProcess(poller_args(queue.url, server.url), aws_env, tmp_path / "poller.log")
        try:
            poller.wait_for_workers(2)
            started = time.monotonic()
            ids = send_messages(sqs, queue.url, entries)
            wait_until(lambda: len(server.received) >= len(ids), 300, "all 5000 events at the sink")
            elapsed = time.monotonic() - started
            wait_empty(sqs, queue.url, 60)
        finally:
            code = poller.stop()
        assert code == 0, poller.log_text()[-3000:]

    by_id = dict(zip(ids, entries))
    counts = Counter(accepted_ids(server))
    duplicates = sum(n - 1 for n in counts.values())
    print(f"\n5000 messages through 2 processes: {len(ids) / elapsed:.0f} msg/s "
          f"(send included), duplicates {duplicates}")
    assert set(counts) == set(ids)
    assert duplicates == 0
    for received in server.received:
        event = from_http_event(HTTPMessage(dict(received.headers), received.body))
        sent = by_id[event.get_id()]
        assert event.get_type() == "aws.sqs.message"
        assert event.get_source() == queue.url
        assert event.get_time() is not None
        data = event.get_data()
        assert isinstance(data, dict)
        assert data["Body"] == sent["MessageBody"]
        assert data["MessageId"] == event.get_id()
        if "MessageAttributes" in sent:
            assert event.get_extension("trace") == sent["MessageAttributes"]["trace"]["StringValue"]
            assert event.get_extension("amount") == sent["MessageAttributes"]["amount"]["StringValue"]
            assert set(data["MessageAttributes"]) == {"trace", "amount", "Blob"}
        else:
            assert event.get_extension("trace") is None


def test_fifo_groups_arrive_in_order(sqs: Any, make_queue: Any, aws_env: dict[str, str], tmp_path: Path) -> None:
    queue = make_queue(fifo=True, visibility_timeout=30)
    arrival: list[tuple[str, int]] = []
    lock = threading.Lock()

    def one_at_a_time(event: dict[str, Any], headers: Any) -> None:
        # A single-threaded sink: requests are processed one after the other.
        with lock:
            body = event["data"]["Body"]
            group, seq = body.split(":")
            arrival.append((group, int(seq)))
            time.sleep(0.001)

    groups = [f"g{n}" for n in range(8)]
    entries = [
        {"MessageBody": f"{g}:{seq}", "MessageGroupId": g}
        for seq in range(40) for g in groups
    ]
    with sink(on_event=one_at_a_time) as server:
        poller = PollerProcess(poller_args(queue.url, server.url), aws_env, tmp_path / "poller.log")
        try:
            send_messages(sqs, queue.url, entries)
            wait_until(lambda: len(server.received) >= len(entries), 120, "all FIFO events")
            wait_empty(sqs, queue.url, 60)
        finally:
            assert poller.stop() == 0
    for g in groups:
        seqs = [seq for group, seq in arrival if group == g]
        assert seqs == list(range(40)), f"group {g} arrived out of order: {seqs}"


def test_rejected_messages_go_to_the_dlq_and_the_rest_flow(
    sqs: Any, make_queue: Any, aws_env: dict[str, str], tmp_path: Path
) -> None:
    queue = make_queue(visibility_timeout=2, dlq_max_receive_count=2)

    def reject_bad(event: dict[str, Any], headers: Any) -> int | None:
        return 400 if event["data"]["Body"].startswith("bad") else None

    # Fewer bad ones than REFUSAL_RUN: once the good ones are gone, as many refusals alike would be
    # taken for a broken sink (they would wait for an accepted event; the fault suite's case).
    # With no 2xx after it, a refusal is a verdict at the attempt's deadline: --http-timeout 3.
    bad = REFUSAL_RUN - 1
    bodies = [f"good {i}" for i in range(100)] + [f"bad {i}" for i in range(bad)]
    with sink(respond=reject_bad) as server:
        ids = send_messages(sqs, queue.url, bodies)
        poller = PollerProcess(poller_args(queue.url, server.url, "--http-timeout", "3"), aws_env,
                               tmp_path / "poller.log")
        try:
            wait_until(lambda: len(set(accepted_ids(server))) >= 100, 60, "the good messages")
            dead: list[dict[str, Any]] = []

            def dlq_has_all_bad() -> bool:
                dead.extend(drain(sqs, queue.dlq_url, idle_receives=1, wait_seconds=1))
                return len(dead) >= bad

            wait_until(dlq_has_all_bad, 90, "the rejected messages in the DLQ")
            wait_empty(sqs, queue.url, 30)
        finally:
            assert poller.stop() == 0
    assert sorted(m["Body"] for m in dead) == sorted(f"bad {i}" for i in range(bad))
    assert {e["data"]["Body"] for e in server.events} == {f"good {i}" for i in range(100)}
    assert set(accepted_ids(server)) == set(ids[:100])
    assert "rejected message" in poller.log_text()


def test_a_scrape_during_a_real_run_matches_what_the_sink_received(
    sqs: Any, make_queue: Any, aws_env: dict[str, str], tmp_path: Path
) -> None:
    queue = make_queue(visibility_timeout=30)
    port = free_port()

    def scrape() -> dict[str, float]:
        samples = metric_samples(port)
        for sample in samples:
            assert sample.labels.get("queue") == queue.name and sample.labels.get("channel") == "http"
        return metrics_by_key(samples)

    with sink() as server:
        ids = send_messages(sqs, queue.url, [f"metric {i}" for i in range(50)])
        poller = PollerProcess(
            poller_args(queue.url, server.url, "--metrics-port", str(port), "--metrics-host", "127.0.0.1"),
            aws_env, tmp_path / "poller.log",
        )
        try:
            wait_until(lambda: len(server.received) >= len(ids), 60, "the events")
            # Counters reach the supervisor once a second.
            wait_until(lambda: scrape().get("sqs_poller_messages_deleted_total") == 50, 15, "metrics")
            metrics = scrape()
            delivered = len({e["id"] for e in server.events})
        finally:
            assert poller.stop() == 0
    assert metrics["sqs_poller_messages_received_total"] == delivered == 50
    assert metrics["sqs_poller_messages_acked_total"] == delivered
    assert metrics["sqs_poller_messages_rejected_total"] == 0
    assert metrics["sqs_poller_messages_in_flight"] == 0
    assert metrics["sqs_poller_workers"] == 2
    assert metrics["sqs_poller_worker_restarts_total"] == 0
    # Every delivery and every receive measured: the +Inf bucket counts them all.
    assert metrics["sqs_poller_publish_seconds_count"] == metrics["sqs_poller_publish_seconds_bucket[+Inf]"] == 50
    assert metrics["sqs_poller_receive_seconds_count"] >= 5
    assert metrics["sqs_poller_delete_seconds_count"] >= 5
    assert metrics["sqs_poller_publish_seconds_sum"] > 0



def test_healthz_flips_when_a_worker_stalls_and_readyz_when_ready(
    sqs: Any, make_queue: Any, aws_env: dict[str, str], tmp_path: Path
) -> None:
    queue = make_queue(visibility_timeout=30)
    port = free_port()
    with sink() as server:
        poller = PollerProcess(poller_args(queue.url, server.url, "--health-port", str(port)),
                               aws_env, tmp_path / "poller.log")
        try:
            wait_until(lambda: http_get(port, "/readyz", 5)[0] == 200, 30, "ready")
            # Both workers beating ("ok", no notes): one still starting when stopped would be
            # "starting" for ever, never "no heartbeat" (seen under load).
            wait_until(lambda: http_get(port, "/healthz", 5)[:2] == (200, "ok\n"), 60, "both workers healthy")
            assert http_get(port, "/metrics", 5)[0] == 404  # --health-port alone serves no metrics
            victim = poller.worker_pids()[0]
            os.kill(victim, signal.SIGSTOP)  # alive, but stuck: no heartbeat
            try:
                # One stuck worker is named, but the pod stays live: the supervisor replaces it
                # (--worker-timeout) while the other one works; liveness fails only when none does.
                wait_until(lambda: "no heartbeat" in http_get(port, "/healthz", 5)[1], 30, "/healthz to see the stall")
                assert http_get(port, "/healthz", 5)[0] == 200
            finally:
                os.kill(victim, signal.SIGCONT)
            wait_until(lambda: "no heartbeat" not in http_get(port, "/healthz", 5)[1], 30, "healthy again")
            os.kill(poller.worker_pids()[0], signal.SIGKILL)  # dead: named until it is replaced
            wait_until(lambda: "not running" in http_get(port, "/healthz", 5)[1], 10, "/healthz to see the death",
                       interval=0.02)
            assert http_get(port, "/healthz", 5)[0] == 200 and http_get(port, "/readyz", 5)[0] == 200
            wait_until(lambda: "not running" not in http_get(port, "/healthz", 5)[1], 30, "the worker replaced")
        finally:
            assert poller.stop() == 0


def test_until_empty_exits_0_with_the_queue_empty(
    sqs: Any, make_queue: Any, aws_env: dict[str, str], tmp_path: Path
) -> None:
    queue = make_queue(visibility_timeout=30)
    with sink() as server:
        ids = send_messages(sqs, queue.url, [f"batch {i}" for i in range(300)])
        poller = PollerProcess(poller_args(queue.url, server.url, "--until-empty", "--log-format", "json"),
                               aws_env, tmp_path / "poller.log")
        assert poller.proc.wait(120) == 0, poller.log_text()[-3000:]
        delivered = set(accepted_ids(server))
    assert delivered == set(ids)
    assert queue_counts(sqs, queue.url) == (0, 0)
    lines = poller.log_text().splitlines()
    assert lines and all(json.loads(line)["level"] for line in lines)  # --log-format json: every line
    assert any("the queue is empty" in json.loads(line)["message"] for line in lines)


def test_max_messages_stops_after_that_many_and_leaves_the_rest(
    sqs: Any, make_queue: Any, aws_env: dict[str, str], tmp_path: Path
) -> None:
    queue = make_queue(visibility_timeout=30)
    with sink() as server:
        ids = send_messages(sqs, queue.url, [f"batch {i}" for i in range(100)])
        poller = PollerProcess(poller_args(queue.url, server.url, "--max-messages", "35"),
                               aws_env, tmp_path / "poller.log")
        assert poller.proc.wait(120) == 0, poller.log_text()[-3000:]
        delivered = set(accepted_ids(server))
    assert len(delivered) == 35 and delivered <= set(ids)
    remaining = {m["MessageId"] for m in drain(sqs, queue.url)}
    assert remaining == set(ids) - delivered


def test_secrets_never_reach_logs_or_command_lines(
    sqs: Any, make_queue: Any, aws_env: dict[str, str], tmp_path: Path
) -> None:
    """AWS keys, a session token, a SASL password and sink credentials, at DEBUG, through
    failures that log the sink: none of them in the output or any process's command line."""
    secrets = {
        "AWS_SECRET_ACCESS_KEY": f"aws-secret-{os.urandom(6).hex()}",
        "AWS_SESSION_TOKEN": f"aws-token-{os.urandom(6).hex()}",
        "KAFKA_SASL_PASSWORD": f"sasl-pw-{os.urandom(6).hex()}",
    }
    sink_password, sink_token = f"sink-pw-{os.urandom(6).hex()}", f"sink-tok-{os.urandom(6).hex()}"
    queue = make_queue(visibility_timeout=30)
    failing_until = [0.0]

    def fail_first(event: dict[str, Any], headers: Any) -> int | None:
        if not failing_until[0]:
            failing_until[0] = time.monotonic() + 3
        # 503s for 3 s: warnings that show the sink (retries, the circuit), then delivery.
        return 503 if time.monotonic() < failing_until[0] else None

    with sink(respond=fail_first) as server:
        ids = send_messages(sqs, queue.url, [f"s{i}" for i in range(50)])
        sink_url = server.url.replace("http://", f"http://poller:{sink_password}@") + f"?token={sink_token}"
        args = [a for a in poller_args(queue.url, sink_url, "--log-level", "DEBUG")]
        args[args.index("--sink"):args.index("--sink") + 2] = []  # the sink comes from K_SINK
        env = {**aws_env, **secrets, "K_SINK": sink_url}
        poller = PollerProcess(args, env, tmp_path / "poller.log")
        try:
            pids = poller.wait_for_workers(2)
            cmdlines = [Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                        for pid in [poller.pid, *pids]]
            wait_until(lambda: set(accepted_ids(server)) >= set(ids), 120, "every message")
        finally:
            assert poller.stop() == 0
        assert server.received[0].headers["authorization"].startswith("Basic ")
    log = poller.log_text()
    assert "503" in log and "sink http://127.0.0.1" in log  # the sink was shown, redacted
    for secret in (*secrets.values(), sink_password, sink_token):
        assert secret not in log, f"a secret ({secret[:8]}...) is in the log"
        for cmdline in cmdlines:
            assert secret not in cmdline, f"a secret ({secret[:8]}...) is in a command line"
