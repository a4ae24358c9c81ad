"""KafkaChannel against a real Kafka-protocol broker (tansu), read back and judged by the cloudevents SDK."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from cloudevents.core.bindings import kafka as ce_kafka
from confluent_kafka import Consumer

from channels.base import ChannelError, Message, Outcome
from support import consume_topic
from channels.kafka import KafkaChannel, KafkaConfig

pytestmark = pytest.mark.integration
log = logging.getLogger(__name__)

SOURCE = "http://127.0.0.1:4566/queue/us-east-1/000000000000/orders"
SENT = 1_700_000_000_123


@pytest.fixture(scope="module")
def bootstrap(kafka_broker: str) -> str:
    return kafka_broker


# -- helpers ----------------------------------------------------------------------------------


def topic_name() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def make_channel(bootstrap: str, topic: str, **kw: Any) -> KafkaChannel:
    cfg = KafkaConfig(bootstrap_servers=bootstrap, topic=topic, create_topic=True, **kw)
    channel = cfg.create(SOURCE)
    channel.start()
    return channel


def msg(i: int, *, group: str | None = None, body: str | None = None, **attrs: Any) -> Message:
    attributes = {"SentTimestamp": str(SENT + i)}
    if group:
        attributes["MessageGroupId"] = group
    return Message(id=f"m-{i}", body=body if body is not None else f'{{"seq": {i}}}', ack_id=f"r-{i}",
                   attributes=attributes, message_attributes=attrs)


class Reports:
    """Collects reports; each message must be reported exactly once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: dict[str, tuple[Outcome, str]] = {}
        self.order: list[str] = []
        self.duplicates: list[str] = []

    def __call__(self, message: Message, outcome: Outcome, reason: str) -> None:
        with self.lock:
            if message.id in self.seen:
                self.duplicates.append(message.id)
            self.seen[message.id] = (outcome, reason)
            self.order.append(message.id)

    def wait(self, n: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while len(self.seen) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(self.seen) >= n, f"{len(self.seen)} of {n} reported"

    def outcomes(self) -> dict[str, Outcome]:
        return {k: v[0] for k, v in self.seen.items()}


def consume(bootstrap: str, topic: str, expected: int, timeout: float = 30) -> list[Any]:
    """Everything in the topic (at least ``expected`` records, unless ``timeout`` passes first)."""
    return consume_topic(bootstrap, topic, lambda records: len(records) >= expected, timeout, settle=1.0)


def as_kafka_message(record: Any) -> ce_kafka.KafkaMessage:
    return ce_kafka.KafkaMessage(headers=dict(record.headers() or []), key=record.key(), value=record.value())


# -- tests ------------------------------------------------------------------------------------


def test_binary_events_round_trip(bootstrap: str) -> None:
    topic, n = topic_name(), 500
    channel = make_channel(bootstrap, topic, partitions=3)
    reports = Reports()
    messages = [msg(i, tenant={"DataType": "String", "StringValue": f"t{i % 3}"}) for i in range(n)]
    for start in range(0, n, 10):
        channel.publish(messages[start:start + 10], reports)
    reports.wait(n)
    channel.close(5)
    assert set(reports.outcomes().values()) == {Outcome.ACK} and not reports.duplicates

    records = consume(bootstrap, topic, n)
    assert len(records) == n
    by_id = {}
    for record in records:
        event = ce_kafka.from_binary_event(as_kafka_message(record))
        by_id[event.get_id()] = (event, record)
    assert set(by_id) == {m.id for m in messages}
    for i in (0, 1, n - 1):
        event, record = by_id[f"m-{i}"]
        assert event.get_source() == SOURCE and event.get_type() == "aws.sqs.message"
        assert event.get_time() == datetime.fromtimestamp((SENT + i) / 1000, UTC)
        assert event.get_data()["Body"] == f'{{"seq": {i}}}'
        assert event.get_extension("tenant") == f"t{i % 3}"
        assert record.timestamp()[1] == SENT + i and record.key() is None
        assert dict(record.headers())["tenant"] == f"t{i % 3}".encode()


def test_structured_events_round_trip(bootstrap: str) -> None:
    topic, n = topic_name(), 50
    channel = make_channel(bootstrap, topic, format="structured", data_mode="body")
    reports = Reports()
    channel.publish([msg(i, body=f"line {i}") for i in range(n)], reports)
    reports.wait(n)
    channel.close(5)
    records = consume(bootstrap, topic, n)
    events = {e.get_id(): e for e in (ce_kafka.from_structured_event(as_kafka_message(r)) for r in records)}
    assert len(records) == n and len(events) == n
    assert events["m-7"].get_data() == "line 7" and events["m-7"].get_datacontenttype() == "text/plain"
    assert dict(records[0].headers())["content-type"] == b"application/cloudevents+json"


def test_raw_records(bootstrap: str) -> None:
    topic = topic_name()
    channel = make_channel(bootstrap, topic, format="raw", key="attribute:tenant")
    reports = Reports()
    channel.publish([msg(1, body="hello", tenant={"DataType": "String", "StringValue": "acme"})], reports)
    reports.wait(1)
    channel.close(5)
    (record,) = consume(bootstrap, topic, 1)
    assert record.value() == b"hello" and record.key() == b"acme"
    assert record.headers() == [("tenant", b"acme")] and record.timestamp()[1] == SENT + 1


def test_group_key_keeps_each_group_on_one_partition_in_order(bootstrap: str) -> None:
    topic, groups, per_group = topic_name(), 8, 60
    channel = make_channel(bootstrap, topic, partitions=3)
    reports = Reports()
    # SQS FIFO hands out batches mixing groups, each group in order.
    seq = {g: 0 for g in range(groups)}
    batch: list[Message] = []
    i = 0
    while any(v < per_group for v in seq.values()):
        for g in range(groups):
            if seq[g] < per_group:
                batch.append(msg(i, group=f"g{g}", body=f"{g}:{seq[g]}"))
                seq[g] += 1
                i += 1
                if len(batch) == 10:
                    channel.publish(batch, reports)
                    batch = []
    channel.publish(batch, reports)
    reports.wait(groups * per_group)
    channel.close(5)
    assert set(reports.outcomes().values()) == {Outcome.ACK}

    records = consume(bootstrap, topic, groups * per_group)
    assert len(records) == groups * per_group
    partitions: dict[bytes, set[int]] = {}
    order: dict[bytes, list[int]] = {}
    for record in sorted(records, key=lambda r: (r.partition(), r.offset())):
        event = ce_kafka.from_binary_event(as_kafka_message(record))
        group, n = event.get_data()["Body"].split(":")
        assert record.key() == f"g{group}".encode()
        partitions.setdefault(record.key(), set()).add(record.partition())
        order.setdefault(record.key(), []).append(int(n))
    assert all(len(p) == 1 for p in partitions.values())
    assert len({p for ps in partitions.values() for p in ps}) > 1  # spread over partitions
    assert all(seqs == list(range(per_group)) for seqs in order.values())


def test_oversize_record_is_rejected_and_the_rest_flow(bootstrap: str) -> None:
    topic = topic_name()
    channel = make_channel(bootstrap, topic)
    reports = Reports()
    batch = [msg(i) for i in range(5)] + [msg(5, body="x" * 1_100_000)] + [msg(i) for i in range(6, 10)]
    channel.publish(batch, reports)
    reports.wait(10)
    channel.close(5)
    outcomes = reports.outcomes()
    assert outcomes.pop("m-5") is Outcome.REJECT and "too large" in reports.seen["m-5"][1].lower()
    assert set(outcomes.values()) == {Outcome.ACK}
    assert len(consume(bootstrap, topic, 9)) == 9


def test_failure_in_a_fifo_group_retries_the_rest_of_that_group(bootstrap: str) -> None:
    topic = topic_name()
    channel = make_channel(bootstrap, topic)
    reports = Reports()
    batch = [msg(0, group="a", body="a0"), msg(1, group="b", body="b0"), msg(2, group="a", body="x" * 1_100_000),
             msg(3, group="a", body="a2"), msg(4, group="b", body="b1"), msg(5, group="a", body="a3")]
    channel.publish(batch, reports)
    reports.wait(6)
    channel.close(5)
    assert reports.outcomes() == {"m-0": Outcome.ACK, "m-1": Outcome.ACK, "m-2": Outcome.REJECT,
                                  "m-3": Outcome.RETRY, "m-4": Outcome.ACK, "m-5": Outcome.RETRY}
    a_order = [i for i in reports.order if i in ("m-0", "m-2", "m-3", "m-5")]
    assert a_order == ["m-0", "m-2", "m-3", "m-5"]
    records = consume(bootstrap, topic, 3)
    assert sorted(ce_kafka.from_binary_event(as_kafka_message(r)).get_data()["Body"] for r in records) == ["a0", "b0", "b1"]


def test_close_reports_undelivered_as_retry_once(tansu_factory: Any) -> None:
    broker = tansu_factory()  # a broker of this test's own: it gets stopped
    channel = make_channel(broker.endpoint, topic_name(), extra=(("message.timeout.ms", "60000"),))
    reports = Reports()
    channel.publish([msg(0)], reports)
    reports.wait(1)
    broker.stop()
    channel.publish([msg(i) for i in range(1, 21)] + [msg(21, group="g"), msg(22, group="g")], reports)
    started = time.monotonic()
    channel.close(timeout=2)
    assert time.monotonic() - started < 10
    assert len(reports.seen) == 23 and not reports.duplicates
    outcomes = reports.outcomes()
    assert outcomes.pop("m-0") is Outcome.ACK
    assert set(outcomes.values()) == {Outcome.RETRY}
    time.sleep(0.5)
    assert len(reports.order) == 23  # nothing reported after close


def test_missing_topic_is_a_channel_error(bootstrap: str) -> None:
    cfg = KafkaConfig(bootstrap_servers=bootstrap, topic=topic_name())
    with pytest.raises(ChannelError, match="does not exist") as info:
        cfg.create(SOURCE).start()
    assert "\n" not in str(info.value)
    # and it was not auto-created by asking for it
    with pytest.raises(ChannelError, match="does not exist"):
        cfg.create(SOURCE).start()


def test_create_topic_with_partitions(bootstrap: str) -> None:
    topic = topic_name()
    make_channel(bootstrap, topic, partitions=4).close()
    make_channel(bootstrap, topic, partitions=4).close()  # exists now: fine
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "x", "logger": log})
    try:
        assert len(consumer.list_topics(topic, timeout=10).topics[topic].partitions) == 4
    finally:
        consumer.close()


def test_unreachable_broker_is_a_channel_error_in_bounded_time() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = KafkaConfig(bootstrap_servers=f"127.0.0.1:{port}", topic="orders", metadata_timeout=2)
    started = time.monotonic()
    with pytest.raises(ChannelError, match="cannot reach Kafka") as info:
        cfg.create(SOURCE).start()
    assert 1.5 < time.monotonic() - started < 6
    assert "\n" not in str(info.value) and "Connection refused" in str(info.value)


def test_bad_extra_config_is_one_line(bootstrap: str) -> None:
    with pytest.raises(ValueError) as info:
        KafkaConfig(bootstrap_servers=bootstrap, topic="orders", extra=(("no.such.thing", "1"),))
    assert str(info.value) == 'bad --kafka-config: No such configuration property: "no.such.thing"'


def test_throughput(bootstrap: str) -> None:
    """Not a benchmark, a sanity floor; the rate goes to the log."""
    topic, n = topic_name(), 20_000
    channel = make_channel(bootstrap, topic, partitions=3)
    reports = Reports()
    messages = [msg(i) for i in range(n)]
    started = time.monotonic()
    for start in range(0, n, 10):
        channel.publish(messages[start:start + 10], reports)
    reports.wait(n, timeout=120)
    elapsed = time.monotonic() - started
    channel.close(5)
    log.info("KafkaChannel -> tansu: %d binary records in %.2f s = %.0f msg/s", n, elapsed, n / elapsed)
    assert set(reports.outcomes().values()) == {Outcome.ACK}
    assert n / elapsed > 1000
