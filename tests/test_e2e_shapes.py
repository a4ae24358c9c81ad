"""End to end: events shaped like their source, through real LocalStack SQS and the real
``poller run`` to a real HTTP sink (the message dumper, which parses with the cloudevents SDK)
and to a Kafka-protocol broker (tansu).

The bodies are AWS's documented examples (``test_envelopes``), sent as SNS, EventBridge and S3
put them on a queue; ``AWSTraceHeader`` goes through ``SendMessage``'s ``MessageSystemAttributes``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from support import PollerProcess, consume_topic, new_topic, queue_counts, wait_until
from test_envelopes import (
    EVENTBRIDGE_EC2, S3_PUT, S3_TEST_EVENT, SNS_RAW_DELIVERY_OFF, TRACEPARENT, X_RAY, two_records,
)

from poller.kit.dumper import DumperServer

pytestmark = pytest.mark.integration


@contextmanager
def sink(**kwargs: Any) -> Iterator[DumperServer]:
    with open(os.devnull, "w") as devnull, DumperServer("127.0.0.1", 0, out=devnull, keep=True, **kwargs) as server:
        yield server


def args(queue_url: str, *extra: str) -> list[str]:
    return ["--queue-url", queue_url, "--processes", "1", "--wait-time", "1", "--stats-interval", "2",
            "--shutdown-timeout", "20", "--envelope", "auto", *extra]


def send(sqs: Any, url: str, body: str, **extra: Any) -> str:
    return str(sqs.send_message(QueueUrl=url, MessageBody=body, **extra)["MessageId"])


def empty(sqs: Any, url: str) -> bool:
    return sum(queue_counts(sqs, url)) == 0


TRACED = {"MessageSystemAttributes": {"AWSTraceHeader": {"DataType": "String", "StringValue": X_RAY}}}


def test_sns_eventbridge_and_s3_bodies_arrive_shaped_like_their_source(
    sqs: Any, make_queue: Any, aws_env: dict[str, str], tmp_path: Path
) -> None:
    queue = make_queue()
    plain = send(sqs, queue.url, "just text", **TRACED)
    for body in (SNS_RAW_DELIVERY_OFF, EVENTBRIDGE_EC2, two_records(), S3_TEST_EVENT):
        send(sqs, queue.url, body)
    with sink() as server:
        poller = PollerProcess(args(queue.url, "--sink", server.url), aws_env, tmp_path / "poller.log")
        try:
            wait_until(lambda: len(server.received) >= 5, 60, "five events at the sink")
            wait_until(lambda: empty(sqs, queue.url), 30, "every message deleted, the S3 test event too")
        finally:
            assert poller.stop() == 0
        events = {e["id"]: e for e in server.events}
    assert len(server.events) == 5
    sns = events["dc1e94d9-56c5-5e96-808d-cc7f68faa162"]
    assert (sns["source"], sns["type"], sns["subject"]) == (
        "arn:aws:sns:us-east-2:111122223333:ExampleTopic1", "com.amazonaws.sns.notification", "TestSubject")
    assert sns["data"] == "This is a test message." and sns["datacontenttype"] == "text/plain"
    eb = events["6a7e8feb-b491-4cf7-a9f1-bf3703467718"]
    assert (eb["source"], eb["type"]) == ("aws.ec2", "EC2 Instance State-change Notification")
    assert eb["data"] == {"instance-id": "i-1234567890abcdef0", "state": "terminated"}
    happy, sad = events["0055AED6DCD90281E5:ObjectCreated:Put:HappyFace.jpg"], events[f"{_s3_id(events)}"]
    assert happy["source"] == sad["source"] == "arn:aws:s3:::mybucket"
    assert (happy["subject"], sad["subject"]) == ("HappyFace.jpg", "SadFace.jpg")
    assert happy["type"] == "com.amazonaws.s3.ObjectCreated:Put"
    passed = events[plain]
    assert passed["type"] == "aws.sqs.message" and passed["source"] == queue.url
    # LocalStack takes AWSTraceHeader through MessageSystemAttributes and hands it back.
    assert passed["traceparent"] == TRACEPARENT
    assert "S3 test event" in poller.log_text()


def _s3_id(events: dict[str, Any]) -> str:
    """The second record has no sequencer: its id is ``<SQS message id>:1``."""
    [sad] = [i for i in events if i.endswith(":1")]
    return sad


def test_an_s3_message_is_deleted_only_once_both_its_events_were_accepted(
    sqs: Any, make_queue: Any, aws_env: dict[str, str], tmp_path: Path
) -> None:
    queue = make_queue(visibility_timeout=30)
    send(sqs, queue.url, two_records())
    refused: list[str] = []

    def respond(event: dict[str, Any], headers: Any) -> int | None:
        if event["subject"] == "SadFace.jpg" and len(refused) < 2:
            refused.append(event["id"])
            return 503  # the message is retried: both its events are sent again
        return None

    with sink(respond=respond) as server:
        poller = PollerProcess(args(queue.url, "--sink", server.url, "--retries", "5"), aws_env,
                               tmp_path / "poller.log")
        try:
            wait_until(lambda: any(e["subject"] == "SadFace.jpg" for e in server.events), 60, "the refused event")
            wait_until(lambda: empty(sqs, queue.url), 30, "the message deleted")
        finally:
            assert poller.stop() == 0
        subjects = [e["subject"] for e in server.events]
    assert len(refused) == 2
    assert subjects.count("SadFace.jpg") == 1
    # At least once: its other event went again with each retry, under the same id.
    assert subjects.count("HappyFace.jpg") == 3
    assert len({e["id"] for e in server.events if e["subject"] == "HappyFace.jpg"}) == 1


def test_kafka_maps_the_same_way(
    sqs: Any, make_queue: Any, aws_env: dict[str, str], kafka_broker: str, tmp_path: Path
) -> None:
    queue = make_queue()
    topic = new_topic(kafka_broker, partitions=1)
    send(sqs, queue.url, EVENTBRIDGE_EC2, **TRACED)
    send(sqs, queue.url, S3_PUT)
    poller = PollerProcess(
        args(queue.url, "--channel", "kafka", "--kafka-bootstrap-servers", kafka_broker, "--kafka-topic", topic),
        aws_env, tmp_path / "poller.log")
    try:
        wait_until(lambda: empty(sqs, queue.url), 60, "both messages deleted")
    finally:
        assert poller.stop() == 0
    records = consume_topic(kafka_broker, topic, lambda rs: len(rs) >= 2)
    headers = {dict(r.headers())["ce_id"].decode(): dict(r.headers()) for r in records}
    assert len(records) == 2
    eb = headers["6a7e8feb-b491-4cf7-a9f1-bf3703467718"]
    assert eb["ce_source"] == b"aws.ec2" and eb["ce_traceparent"] == TRACEPARENT.encode()
    s3 = headers["0055AED6DCD90281E5:ObjectCreated:Put:HappyFace.jpg"]
    assert s3["ce_type"] == b"com.amazonaws.s3.ObjectCreated:Put" and s3["ce_subject"] == b"HappyFace.jpg"
    [record] = [r for r in records if dict(r.headers())["ce_source"] == b"aws.ec2"]
    assert orjson.loads(record.value()) == {"instance-id": "i-1234567890abcdef0", "state": "terminated"}


# -- small contract gaps: check's region warning, JSON start-up errors, metrics -----------------


def test_check_warns_about_a_region_other_than_the_queue_urls(
    make_queue: Any, aws_env: dict[str, str], tmp_path: Path
) -> None:
    import subprocess
    import sys

    queue = make_queue()
    with sink() as server:
        result = subprocess.run(
            [sys.executable, "-m", "poller", "check", "--queue-url", queue.url, "--sink", server.url,
             "--region", "eu-west-1"],
            env={**os.environ, **aws_env}, capture_output=True, text=True, timeout=60)
    text = result.stdout + result.stderr
    assert "the queue URL is in us-east-1 but the region is eu-west-1" in text, text


def test_start_up_errors_follow_log_format_json(monkeypatch: Any, capsys: Any) -> None:
    from poller.cli import main

    assert main(["run", "--queue-url", "http://127.0.0.1:9/queue/q", "--log-format", "json",
                 "--batch-size", "99"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    doc = orjson.loads(line)
    assert doc["level"] == "ERROR" and "--batch-size" in doc["message"] and set(doc) >= {"time", "logger"}
    monkeypatch.setenv("POLLER_LOG_FORMAT", "json")
    assert main(["check", "--queue-url", "arn:aws:sns:us-east-1:123456789012:t"]) == 2
    assert orjson.loads(capsys.readouterr().err)["message"].startswith("--queue-url")
    monkeypatch.delenv("POLLER_LOG_FORMAT")
    assert main(["run", "--queue-url", "http://127.0.0.1:9/queue/q", "--batch-size", "99"]) == 2
    assert capsys.readouterr().err.startswith("poller: error:")


def test_metrics_show_message_age_and_the_reason_of_rejects(
    sqs: Any, make_queue: Any, aws_env: dict[str, str], tmp_path: Path
) -> None:
    from support import free_port, metric_samples, metrics_by_key

    queue = make_queue(dlq_max_receive_count=1)
    for body in ("fine", "fine too", "refused"):
        send(sqs, queue.url, body)
    port = free_port()

    def samples() -> dict[str, float]:
        return metrics_by_key(metric_samples(port), ("reason", "le"))

    with sink(respond=lambda event, headers: 400 if event["data"].get("Body") == "refused" else None) as server:
        poller = PollerProcess(args(queue.url, "--sink", server.url, "--metrics-port", str(port)), aws_env,
                               tmp_path / "poller.log")
        try:
            wait_until(lambda: samples().get("sqs_poller_messages_acked_total") == 2
                       and samples().get("sqs_poller_messages_rejected_total[sink]") == 1, 60, "the metrics")
            found = samples()
        finally:
            assert poller.stop() == 0
    assert found["sqs_poller_messages_rejected_total[event]"] == found["sqs_poller_messages_rejected_total[other]"] == 0
    assert found["sqs_poller_message_age_seconds_count"] == 2
    assert found["sqs_poller_message_age_seconds_bucket[+Inf]"] == 2
    assert 0 < found["sqs_poller_message_age_seconds_sum"] < 120
