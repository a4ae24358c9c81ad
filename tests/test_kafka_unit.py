"""The Kafka channel's pure parts: config validation, record building, ack/FIFO settlement.

No broker: records are checked with the cloudevents SDK's Kafka binding, and the settlement logic
runs against a fake producer whose delivery reports the test fires in any order.
"""

from __future__ import annotations

import base64
import logging
import pickle
import sys
import threading
import time
import types
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from cloudevents.core.bindings import kafka as ce_kafka
from cloudevents.core.formats.json import JSONFormat
from confluent_kafka import KafkaError, KafkaException

from channels.base import ChannelError, Message, Outcome
from channels.events import EventError
from channels.kafka import (
    DEFAULTS,
    KafkaChannel,
    KafkaConfig,
    RecordBuilder,
    msk_oauth_callback,
    parse_kafka_config,
    parse_kafka_config_env,
)

SOURCE = "https://sqs.us-east-1.amazonaws.com/000000000000/orders"


def config(**kw: Any) -> KafkaConfig:
    return KafkaConfig(**{"bootstrap_servers": "127.0.0.1:9092", "topic": "orders", **kw})


def message(i: int = 1, *, group: str | None = None, body: str = '{"n": 1}', **attrs: Any) -> Message:
    attributes = {"SentTimestamp": "1700000000123", "ApproximateReceiveCount": "1"}
    if group:
        attributes["MessageGroupId"] = group
    return Message(id=f"id-{i}", body=body, ack_id=f"r-{i}", attributes=attributes,
                   message_attributes=attrs, md5_of_body="md5")


def kmsg(record: Any) -> ce_kafka.KafkaMessage:
    return ce_kafka.KafkaMessage(headers=dict(record.headers), key=record.key, value=record.value)


# -- config -----------------------------------------------------------------------------------


def test_defaults_and_user_overrides() -> None:
    conf = config().producer_config()
    assert conf["enable.idempotence"] is True and conf["acks"] == "all"
    assert conf["compression.type"] == "lz4" and conf["linger.ms"] == 50
    assert conf["message.timeout.ms"] == 60_000  # one attempt; the worker retries in place
    assert config(extra=(("linger.ms", "5"), ("compression.type", "zstd"))).producer_config()["linger.ms"] == "5"
    assert set(DEFAULTS) <= set(conf)


@pytest.mark.parametrize(
    ("auth", "expected"),
    [
        ("none", {}),
        ("tls", {"security.protocol": "SSL"}),
        ("scram-sha-512", {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512"}),
        ("iam", {"security.protocol": "SASL_SSL", "sasl.mechanism": "OAUTHBEARER"}),
    ],
)
def test_auth_settings(auth: str, expected: dict[str, str]) -> None:
    conf = config(auth=auth).producer_config()
    assert {k: conf[k] for k in expected} == expected
    if auth == "none":
        assert "security.protocol" not in conf


def test_config_is_picklable_and_hides_extra_in_repr() -> None:
    cfg = config(extra={"sasl.password": "s3cret"}, overrides={"env": "prod"}, key="attribute:tenant")
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert cfg.extra == (("sasl.password", "s3cret"),) and "s3cret" not in repr(cfg)
    assert cfg.name == "kafka"


@pytest.mark.parametrize(
    ("kw", "fragment"),
    [
        ({"format": "avro"}, "Kafka format"),
        ({"data_mode": "all"}, "data mode"),
        ({"key": "attribute:"}, "Kafka key"),
        ({"key": "random"}, "Kafka key"),
        ({"timestamp": "log"}, "Kafka timestamp"),
        ({"auth": "kerberos"}, "Kafka auth"),
        ({"topic": "bad topic"}, "topic name"),
        ({"bootstrap_servers": " "}, "bootstrap"),
        ({"partitions": 0}, "partitions"),
        ({"replication": 0}, "replication"),
        ({"extra": (("foo.bar", "1"),)}, 'No such configuration property: "foo.bar"'),
        ({"extra": (("acks", "banana"),)}, "acks must be all (-1)"),
        ({"extra": (("linger.ms", "banana"),)}, "Invalid value"),
        ({"extra": (("acks", "1"),)}, "acks must be all (-1)"),
        ({"extra": (("error_cb", "x"),)}, "cannot be set"),
        ({"extra": (("default.topic.config", "acks=1"),)}, "default.topic.config cannot be set"),
    ],
)
def test_bad_config_is_a_one_line_value_error(kw: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        config(**kw)
    text = str(info.value)
    assert fragment in text and "\n" not in text


def test_idempotence_can_be_turned_off_by_the_user() -> None:
    """It risks duplicates and reordering (the worker then sends a FIFO group one at a time), not loss."""
    cfg = config(extra=(("enable.idempotence", "false"),))
    assert cfg.producer_config()["enable.idempotence"] == "false" and cfg.producer_config()["acks"] == "all"
    assert not cfg.create(SOURCE).keeps_order


@pytest.mark.parametrize("key", ["acks", "request.required.acks"])
@pytest.mark.parametrize("value", ["0", "1", "2", "none", "01"])
@pytest.mark.parametrize("idempotence", ["true", "false"])
def test_acks_below_all_is_refused(key: str, value: str, idempotence: str) -> None:
    """acks=0/1: the message would be deleted from SQS on a leader's word before the write is
    replicated (acks=0: on no word at all). No --kafka-config can opt in."""
    with pytest.raises(ValueError) as info:
        config(extra=(("enable.idempotence", idempotence), (key, value)))
    assert str(info.value) == (f"--kafka-config {key} must be all (-1): with fewer acks a message would be "
                               "deleted from SQS before the broker wrote it durably")


@pytest.mark.parametrize("value", ["all", "ALL", "-1", " -1"])
def test_acks_all_in_any_spelling_librdkafka_takes_is_accepted(value: str) -> None:
    assert config(extra=(("acks", value),)).producer_config()["acks"] == value


def test_parse_kafka_config() -> None:
    assert parse_kafka_config(["linger.ms=20", "client.id=a=b"]) == (("linger.ms", "20"), ("client.id", "a=b"))
    for bad in ("linger.ms", "=5"):
        with pytest.raises(ValueError, match="KEY=VALUE"):
            parse_kafka_config([bad])


def test_parse_kafka_config_errors_never_echo_the_entry() -> None:
    # "sasl.password=abc def" split on spaces leaves "def": the tail of a password
    with pytest.raises(ValueError) as info:
        parse_kafka_config(["sasl.password=abc", "def"])
    assert "def" not in str(info.value) and "entry 2" in str(info.value)


def test_parse_kafka_config_env_is_one_entry_per_line() -> None:
    text = "# MSK\nsasl.password=abc def \n\n  \nlinger.ms=20\r\n  # indented comment\nclient.id=a=b"
    assert parse_kafka_config_env(text) == (
        ("sasl.password", "abc def "), ("linger.ms", "20"), ("client.id", "a=b"))
    assert parse_kafka_config_env("") == ()


@pytest.mark.parametrize("text", ["linger.ms=5\nhunter2 xyzzy", "linger.ms=5\n=hunter2 xyzzy"])
def test_parse_kafka_config_env_errors_name_the_line_not_the_value(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_kafka_config_env(text)
    message = str(info.value)
    assert "POLLER_KAFKA_CONFIG line 2" in message and "KEY=VALUE" in message
    assert "hunter2" not in message and "xyzzy" not in message


def test_bad_config_value_is_not_echoed() -> None:
    with pytest.raises(ValueError) as info:  # librdkafka says 'Invalid value "s3cret-value" for ...'
        config(extra=(("security.protocol", "s3cret-value"),))
    assert "s3cret-value" not in str(info.value) and "security.protocol" in str(info.value)


# -- records ----------------------------------------------------------------------------------


def test_binary_record_parses_with_the_sdk() -> None:
    msg = message(group="g1", tenant={"DataType": "String", "StringValue": "acme"},
                  blob={"DataType": "Binary", "BinaryValue": "AAE="})  # base64, as SQS's JSON protocol gives it
    record = RecordBuilder(config(overrides={"env": "prod"}), SOURCE).build(msg)
    event = ce_kafka.from_binary_event(kmsg(record))  # every header, the binary attribute's too
    assert ce_kafka.from_kafka(kmsg(record), JSONFormat()).get_id() == "id-1"
    assert event.get_id() == "id-1" and event.get_source() == SOURCE
    assert event.get_type() == "aws.sqs.message"
    assert event.get_time() == datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=UTC)
    assert event.get_extension("tenant") == "acme" and event.get_extension("env") == "prod"
    assert event.get_extension("partitionkey") == "g1"
    assert event.get_datacontenttype() == "application/json"
    assert event.get_data()["Body"] == '{"n": 1}' and event.get_data()["MessageId"] == "id-1"
    headers = dict(record.headers)
    # Binary attributes as base64 text: CloudEvents readers decode every header as UTF-8.
    assert headers["tenant"] == b"acme" and headers["blob"] == b"AAE="
    assert record.key == b"g1"
    assert record.timestamp == 0  # the produce time: retention goes by it, not by SentTimestamp


def test_timestamp_sent_keeps_the_sqs_send_time() -> None:
    for fmt in ("binary", "structured", "raw"):
        record = RecordBuilder(config(format=fmt, timestamp="sent"), SOURCE).build(message())
        assert record.timestamp == 1700000000123
    assert config().timestamp == "now"


def test_body_mode_uses_the_content_type_attribute() -> None:
    msg = message(body="<a/>", **{"content-type": {"DataType": "String", "StringValue": "application/xml"},
                                 "ce_trick": {"DataType": "String", "StringValue": "x"}})
    record = RecordBuilder(config(data_mode="body"), SOURCE).build(msg)
    headers = dict(record.headers)
    assert record.value == b"<a/>" and headers["content-type"] == b"application/xml"
    assert "ce_trick" not in headers  # would be read as a CloudEvents attribute
    assert [name for name, _ in record.headers].count("content-type") == 1


def test_structured_record_parses_with_the_sdk() -> None:
    record = RecordBuilder(config(format="structured", key="none"), SOURCE).build(
        message(group="g1", tenant={"DataType": "Number", "StringValue": "7"}))
    assert dict(record.headers)["content-type"] == b"application/cloudevents+json"
    assert dict(record.headers)["tenant"] == b"7" and record.key is None
    event = ce_kafka.from_structured_event(kmsg(record))
    assert event.get_id() == "id-1" and event.get_data()["Body"] == '{"n": 1}'
    assert event.get_extension("tenant") == "7"


def test_raw_record_is_the_body_with_attributes_as_headers() -> None:
    msg = message(body="plain text", **{
        "content-type": {"DataType": "String", "StringValue": "text/csv"},
        "sig": {"DataType": "Binary.sha", "BinaryValue": base64.b64encode(b"\xff").decode()},
    })
    record = RecordBuilder(config(format="raw"), SOURCE).build(msg)
    assert record.value == b"plain text" and record.key is None  # standard queue: no group
    assert record.headers == [("content-type", b"text/csv"), ("sig", b"\xff")]
    assert record.timestamp == 0


@pytest.mark.parametrize("fmt", ["binary", "structured", "raw"])
@pytest.mark.parametrize("data_mode", ["message", "body"])
def test_an_event_format_content_type_never_makes_a_forged_event(fmt: str, data_mode: str) -> None:
    """A sender's content-type attribute ``application/cloudevents+json`` with an event as the body:
    a CloudEvents reader of the record must see the queue's event (its MessageId), or the message
    is refused; never the sender's id."""
    forged = '{"specversion":"1.0","id":"spoofed-id","source":"https://payments.example/ledger","type":"x"}'
    msg = message(body=forged, **{"Content-Type": {"DataType": "String",
                                                   "StringValue": "Application/CloudEvents+JSON; charset=utf-8"}})
    builder = RecordBuilder(config(format=fmt, data_mode=data_mode), SOURCE)
    try:
        record = builder.build(msg)
    except EventError as exc:
        assert "refused" in str(exc)
        assert fmt == "raw" or data_mode == "body"  # refused only where it would be a content type
        return
    assert data_mode == "message" and fmt != "raw"
    assert ce_kafka.from_kafka(kmsg(record), JSONFormat()).get_id() == "id-1"


def test_raw_refuses_ce_attributes_that_would_make_a_forged_event() -> None:
    """raw copies attributes as headers: ce_specversion, ce_id, ... would make a CloudEvents
    reader take the record for a binary-mode event of the sender's making."""
    forged = {name: {"DataType": "String", "StringValue": value} for name, value in (
        ("ce_specversion", "1.0"), ("ce_id", "FORGED-ID"), ("ce_source", "https://bank.example/"),
        ("ce_type", "payment.approved"))}
    with pytest.raises(EventError, match="refused"):
        RecordBuilder(config(format="raw"), SOURCE).build(message(body="x", **forged))
    record = RecordBuilder(config(format="binary"), SOURCE).build(message(body="x", **forged))
    assert ce_kafka.from_kafka(kmsg(record), JSONFormat()).get_id() == "id-1"  # the queue's event


def test_key_from_attribute() -> None:
    builder = RecordBuilder(config(key="attribute:tenant"), SOURCE)
    assert builder.key(message(tenant={"DataType": "String", "StringValue": "acme"})) == b"acme"
    assert builder.key(message(group="g")) is None


def test_unmappable_message_is_an_event_error() -> None:
    from channels.events import EventError

    bad = message(**{"content-type": {"DataType": "String", "StringValue": "not a type"}})
    with pytest.raises(EventError):
        RecordBuilder(config(data_mode="body"), SOURCE).build(bad)


def test_msk_oauth_callback(monkeypatch: pytest.MonkeyPatch) -> None:
    regions: list[str] = []
    signer = types.ModuleType("aws_msk_iam_sasl_signer")
    signer.MSKAuthTokenProvider = types.SimpleNamespace(  # type: ignore[attr-defined]
        generate_auth_token=lambda region: regions.append(region) or ("tok", 1_800_000_000_000))
    monkeypatch.setitem(sys.modules, "aws_msk_iam_sasl_signer", signer)
    assert msk_oauth_callback("eu-west-1")("") == ("tok", 1_800_000_000.0)
    assert regions == ["eu-west-1"]


def test_msk_oauth_callback_signs_with_the_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []
    signer = types.ModuleType("aws_msk_iam_sasl_signer")
    signer.MSKAuthTokenProvider = types.SimpleNamespace(  # type: ignore[attr-defined]
        generate_auth_token_from_profile=lambda region, profile: calls.append((region, profile)) or ("t", 1000))
    monkeypatch.setitem(sys.modules, "aws_msk_iam_sasl_signer", signer)
    assert msk_oauth_callback("eu-west-1", "prod")("") == ("t", 1.0)
    assert calls == [("eu-west-1", "prod")]


def test_bootstrap_servers_as_a_url_is_a_one_line_hint() -> None:
    with pytest.raises(ValueError, match="host:port"):
        config(bootstrap_servers="http://broker:9092")


def test_msk_without_the_extra_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "aws_msk_iam_sasl_signer", None)  # import fails
    with pytest.raises(ChannelError, match=r"msk extra"):
        msk_oauth_callback("eu-west-1")


def test_scram_needs_credentials_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KAFKA_SASL_USERNAME", raising=False)
    monkeypatch.delenv("KAFKA_SASL_PASSWORD", raising=False)
    with pytest.raises(ChannelError, match="KAFKA_SASL_USERNAME"):
        config(auth="scram-sha-512").create(SOURCE).start()


# -- settlement (fake producer) ---------------------------------------------------------------


class FakeProducer:
    """Records produce() calls; the test fires their delivery reports. Never delivers by itself:
    poll and flush wait (up to their timeout) like a producer whose broker does not answer."""

    def __init__(self, fail_sync: Callable[[bytes], KafkaError | None] = lambda v: None) -> None:
        self.callbacks: list[tuple[bytes, Callable[[KafkaError | None, Any], None]]] = []
        self.fail_sync = fail_sync
        self.buffer_full = 0
        self.stuck = threading.Event()  # set: poll() hangs (a callback that does not return)
        self.unstuck = threading.Event()
        self.purged = False
        self.broker_down = False  # list_topics (a metadata request) fails
        self.metadata_requests = 0

    def produce(self, topic: str, value: bytes, key: bytes | None, *, headers: Any, timestamp: int,
                on_delivery: Callable[[KafkaError | None, Any], None]) -> None:
        if self.buffer_full:
            self.buffer_full -= 1
            raise BufferError("Local: Queue full")
        err = self.fail_sync(value)
        if err is not None:
            raise KafkaException(err)
        self.callbacks.append((value, on_delivery))

    def poll(self, timeout: float = 0) -> int:
        if self.stuck.is_set():
            self.unstuck.wait(30)
        time.sleep(min(timeout, 0.02))
        return 0

    def flush(self, timeout: float = 0) -> int:
        time.sleep(min(timeout, 0.02))
        return len(self.callbacks)

    def purge(self, in_queue: bool = True, in_flight: bool = True, blocking: bool = True) -> None:
        self.purged = True

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Any:
        self.metadata_requests += 1
        if self.broker_down:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, "Connection refused"))
        return types.SimpleNamespace(topics={})

    def deliver(self, index: int, err: KafkaError | None = None, msg: Any = None) -> None:
        self.callbacks[index][1](err, msg)


def channel_with(producer: FakeProducer, **kw: Any) -> tuple[KafkaChannel, list[tuple[str, Outcome]]]:
    channel = config(format="raw", **kw).create(SOURCE)
    channel._producer = producer  # type: ignore[assignment]  # skip start(): no broker here
    reports: list[tuple[str, Outcome]] = []
    return channel, reports


class DeliveredRecord:
    """What a delivery report carries besides the error: where the record landed."""

    def __init__(self, partition: int, offset: int) -> None:
        self._partition, self._offset = partition, offset

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset


def test_an_ack_without_an_offset_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """librdkafka acks a DUPLICATE_SEQUENCE_NUMBER answer with offset -1: still an ACK (the
    broker says it holds the record), but said in the log; a normal ack is said only at DEBUG."""
    producer = FakeProducer()
    channel, reports = channel_with(producer)
    channel.publish([message(i) for i in range(2)], lambda m, o, r: reports.append((m.id, o)))
    with caplog.at_level(logging.DEBUG, logger="channels.kafka"):
        producer.deliver(0, msg=DeliveredRecord(2, 41))
        producer.deliver(1, msg=DeliveredRecord(2, -1))
    assert reports == [("id-0", Outcome.ACK), ("id-1", Outcome.ACK)]
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if "id-" in r.getMessage()]
    assert lines == [("DEBUG", "message id-0 delivered to partition 2 at offset 41"),
                     ("WARNING", "Kafka acked message id-1 as stored by an earlier send (a duplicate "
                                 "sequence number, no offset given)")]


def test_standard_messages_are_reported_as_their_reports_arrive() -> None:
    producer = FakeProducer()
    channel, reports = channel_with(producer)
    channel.publish([message(i, body=str(i)) for i in range(3)], lambda m, o, r: reports.append((m.id, o)))
    producer.deliver(2)
    producer.deliver(0, KafkaError(KafkaError._MSG_TIMED_OUT))
    producer.deliver(1, KafkaError(KafkaError.INVALID_RECORD))
    assert reports == [("id-2", Outcome.ACK), ("id-0", Outcome.RETRY), ("id-1", Outcome.REJECT)]
    assert channel.pending == 0


def test_each_record_is_reported_when_its_delivery_report_arrives() -> None:
    """No holding in the channel: FIFO order is the worker's (it keeps a group's acks in order)."""
    producer = FakeProducer()
    channel, reports = channel_with(producer)
    batch = [message(0, group="a"), message(1, group="b"), message(2, group="a"), message(3, group="a")]
    channel.publish(batch, lambda m, o, r: reports.append((m.id, o)))
    assert channel.keeps_order  # key=group, idempotent: a group's records land in produce order
    producer.deliver(3)
    producer.deliver(1)
    producer.deliver(2, KafkaError(KafkaError.NOT_ENOUGH_REPLICAS))
    producer.deliver(0)
    assert reports == [("id-3", Outcome.ACK), ("id-1", Outcome.ACK), ("id-2", Outcome.RETRY),
                       ("id-0", Outcome.ACK)]


def test_a_record_that_cannot_be_produced_is_rejected_and_the_rest_still_go() -> None:
    big = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)
    producer = FakeProducer(fail_sync=lambda value: big if value == b"big" else None)
    channel, reports = channel_with(producer)
    batch = [message(0, group="a", body="ok"), message(1, group="a", body="big"),
             message(2, group="a", body="later")]
    channel.publish(batch, lambda m, o, r: reports.append((m.id, o)))
    assert [value for value, _ in producer.callbacks] == [b"ok", b"later"]
    assert reports == [("id-1", Outcome.REJECT)]


def test_a_record_sent_alone_is_retry_when_a_later_one_of_its_group_may_be_ahead() -> None:
    producer, alone = FakeProducer(), FakeProducer()
    channel, reports = channel_with(producer)
    with_alone_producer(channel, alone)
    reasons: dict[str, str] = {}

    def report(m: Message, o: Outcome, r: str) -> None:
        reports.append((m.id, o))
        reasons[m.id] = r

    batch = [message(0, group="a"), message(1, group="a"), message(2), message(3, group="b")]
    channel.publish(batch, report)
    for i in (0, 2, 3):
        producer.deliver(i, TOO_LARGE)  # their batches were refused: each goes again alone
    producer.deliver(1)  # a1 landed, maybe ahead of a0's resend
    channel._poll_once(producer, 0)
    assert len(alone.callbacks) == 3
    for i in range(3):
        alone.deliver(i)
    # a0 had a later message of its group in the same publish: the worker must send both again,
    # in order. The standard message and b's last one were alone in their group: delivered.
    assert reports == [("id-1", Outcome.ACK), ("id-0", Outcome.RETRY), ("id-2", Outcome.ACK),
                       ("id-3", Outcome.ACK)]
    assert "alone" in reasons["id-0"]


def test_a_full_local_queue_never_blocks_publish() -> None:
    """publish runs on the worker's loop (heartbeats, visibility extensions): with librdkafka's
    local queue full it returns at once; the poll thread moves the records over, in order, as
    deliveries make room. A record that finds others waiting goes behind them, room or not."""
    producer = FakeProducer()
    producer.buffer_full = 1  # the first produce finds the queue full; after it there is room
    channel, reports = channel_with(producer)
    channel._queue_wait = 2.0  # message.timeout.ms: the longest a record waits for room
    started = time.monotonic()
    channel.publish([message(0, group="a", body="a0"), message(1, group="a", body="a1")],
                    lambda m, o, r: reports.append((m.id, o)))
    channel.publish([message(2, body="s")], lambda m, o, r: reports.append((m.id, o)))
    assert time.monotonic() - started < 1  # not a wait for room
    assert producer.callbacks == [] and reports == [] and channel.pending == 3
    channel._poll_once(producer, 0)  # the poll thread's round
    assert [value for value, _ in producer.callbacks] == [b"a0", b"a1", b"s"]
    for i in range(3):
        producer.deliver(i)
    assert reports == [("id-0", Outcome.ACK), ("id-1", Outcome.ACK), ("id-2", Outcome.ACK)]
    assert channel.pending == 0


def test_records_wait_for_room_until_the_message_timeout_then_retry() -> None:
    producer = FakeProducer()
    producer.buffer_full = 10**9  # broker down: the local queue never drains
    channel, reports = channel_with(producer)
    channel._queue_wait = 0.3
    reasons: dict[str, str] = {}

    def report(m: Message, o: Outcome, r: str) -> None:
        reports.append((m.id, o))
        reasons[m.id] = r

    channel.publish([message(0), message(1, group="g"), message(2, group="g")], report)
    channel._poll_once(producer, 0)
    assert reports == []  # still within message.timeout.ms
    time.sleep(0.35)
    channel._poll_once(producer, 0)
    assert reports == [("id-0", Outcome.RETRY), ("id-1", Outcome.RETRY), ("id-2", Outcome.RETRY)]
    assert reasons["id-0"] == "Kafka producer queue still full after 0.3 s"
    assert channel.pending == 0


def test_shed_gives_back_what_waits_for_room() -> None:
    """The worker's circuit opened: records still waiting for room were not sent; they wait for
    the circuit instead of going into the outage."""
    producer = FakeProducer()
    producer.buffer_full = 1
    channel, reports = channel_with(producer)
    channel.publish([message(0)], lambda m, o, r: reports.append((m.id, o)))  # waits
    producer.buffer_full = 10**9
    channel.publish([message(1)], lambda m, o, r: reports.append((m.id, o)))  # waits behind it
    channel.shed()
    assert reports == [("id-0", Outcome.RETRY), ("id-1", Outcome.RETRY)]
    producer.buffer_full = 0
    channel._poll_once(producer, 0)
    assert producer.callbacks == [] and channel.pending == 0


def test_event_error_rejects_that_message_only() -> None:
    producer = FakeProducer()
    channel = config(data_mode="body").create(SOURCE)
    channel._producer = producer  # type: ignore[assignment]
    reports: list[tuple[str, Outcome, str]] = []
    bad = message(0, **{"content-type": {"DataType": "String", "StringValue": "nope"}})
    channel.publish([bad, message(1)], lambda m, o, r: reports.append((m.id, o, r)))
    producer.deliver(0)
    assert [(i, o) for i, o, _ in reports] == [("id-0", Outcome.REJECT), ("id-1", Outcome.ACK)]
    assert "content-type" in reports[0][2]


def test_close_reports_pending_once_and_ignores_late_reports() -> None:
    producer = FakeProducer()
    channel, reports = channel_with(producer)
    batch = [message(0, group="a"), message(1, group="a"), message(2)]
    channel.publish(batch, lambda m, o, r: reports.append((m.id, o)))
    producer.deliver(0)
    channel.close(timeout=0)
    assert sorted(reports) == [("id-0", Outcome.ACK), ("id-1", Outcome.RETRY), ("id-2", Outcome.RETRY)]
    producer.deliver(1)
    producer.deliver(2)  # late: ignored
    assert len(reports) == 3


def test_publish_before_start_is_an_error() -> None:
    with pytest.raises(ChannelError):
        config().create(SOURCE).publish([message()], lambda m, o, r: None)


def test_structured_value_is_json() -> None:
    record = RecordBuilder(config(format="structured", data_mode="body"), SOURCE).build(message(body="hi"))
    doc = orjson.loads(record.value)
    assert doc["data"] == "hi" and doc["datacontenttype"] == "text/plain"


# -- batch-wide size errors: each record once more on its own -------------------------------

TOO_LARGE = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)


def with_alone_producer(channel: KafkaChannel, alone: FakeProducer) -> list[dict[str, Any]]:
    """Make ``alone`` the channel's single-record producer; returns the configs it was made with."""
    confs: list[dict[str, Any]] = []
    channel._conf = {"bootstrap.servers": "b:9092", "linger.ms": 5, "enable.idempotence": True,
                     "transactional.id": "t", "enable.gapless.guarantee": True}
    channel._new_producer = lambda conf: confs.append(conf) or alone
    return confs


@pytest.mark.parametrize("code", [KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE])
def test_batch_wide_size_error_sends_each_record_alone_before_rejecting(code: int) -> None:
    producer, alone = FakeProducer(), FakeProducer()
    channel, reports = channel_with(producer)
    confs = with_alone_producer(channel, alone)
    channel.publish([message(i, body=str(i)) for i in range(3)], lambda m, o, r: reports.append((m.id, o)))
    for i in range(3):  # the broker refused the batch: every record gets the error
        producer.deliver(i, KafkaError(code))
    assert reports == []  # maybe the batch's fault, not theirs
    channel._poll_once(producer, 0)  # the poll thread sends them alone
    assert [value for value, _ in alone.callbacks] == [b"0", b"1", b"2"]
    (conf,) = confs
    assert conf["batch.num.messages"] == 1 and conf["linger.ms"] == 0
    assert conf["enable.idempotence"] is False and conf["max.in.flight.requests.per.connection"] == 1
    assert "transactional.id" not in conf and "enable.gapless.guarantee" not in conf
    alone.deliver(0)
    alone.deliver(1, KafkaError(code))  # too large on its own: now it is the record's fault
    alone.deliver(2)
    assert reports == [("id-0", Outcome.ACK), ("id-1", Outcome.REJECT), ("id-2", Outcome.ACK)]
    assert channel.pending == 0


def test_single_record_producer_that_cannot_be_made_retries() -> None:
    producer = FakeProducer()
    channel, reports = channel_with(producer)

    def fail(conf: dict[str, Any]) -> Any:
        raise KafkaException(KafkaError(KafkaError._INVALID_ARG, "nope"))

    channel._new_producer = fail
    channel.publish([message(0)], lambda m, o, r: reports.append((m.id, o)))
    producer.deliver(0, TOO_LARGE)
    channel._poll_once(producer, 0)
    assert reports == [("id-0", Outcome.RETRY)]


# -- shutdown, full queue, stalls -------------------------------------------------------------


def start_polling(channel: KafkaChannel) -> None:
    channel._start_polling()  # the poll thread, as start() runs it, over the fake producer


def test_close_gives_back_what_waits_for_room_once() -> None:
    producer = FakeProducer()
    producer.buffer_full = 10**9  # broker down: the local queue never drains
    channel, reports = channel_with(producer)
    start_polling(channel)
    lock = threading.Lock()

    def report(m: Message, o: Outcome, r: str) -> None:
        with lock:
            reports.append((m.id, o))

    channel.publish([message(i) for i in range(5)], report)
    time.sleep(0.3)  # the poll thread tries to move them over a few times
    channel.close(timeout=0.5)
    assert sorted(reports) == [(f"id-{i}", Outcome.RETRY) for i in range(5)]  # each once
    producer.buffer_full = 0
    channel._poll_once(producer, 0)
    assert producer.callbacks == [] and len(reports) == 5


def test_close_returns_in_time_when_the_poll_thread_is_stuck() -> None:
    producer = FakeProducer()
    channel, reports = channel_with(producer)
    start_polling(channel)
    channel.publish([message(0), message(1)], lambda m, o, r: reports.append((m.id, o)))
    producer.stuck.set()  # e.g. a report callback that never returns
    started = time.monotonic()
    channel.close(timeout=0.5)
    assert time.monotonic() - started < 5  # 0.5 s plus a fraction; loose for a busy machine
    assert sorted(reports) == [("id-0", Outcome.RETRY), ("id-1", Outcome.RETRY)]
    assert producer.purged
    producer.unstuck.set()
    producer.deliver(0)  # late: ignored
    assert len(reports) == 2


def test_publish_after_close_returns_the_messages() -> None:
    producer = FakeProducer()
    channel, reports = channel_with(producer)
    channel.close(timeout=0)
    channel.publish([message(0)], lambda m, o, r: reports.append((m.id, o)))
    assert reports == [("id-0", Outcome.RETRY)] and producer.callbacks == []


def wait_for(predicate: Callable[[], object], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_stalled_when_the_poll_thread_does_not_come_round() -> None:
    producer = FakeProducer()
    channel, _ = channel_with(producer)
    channel.stall_after = 0.3
    assert channel.stalled() is None  # not started
    start_polling(channel)
    assert channel.stalled() is None
    producer.stuck.set()
    wait_for(channel.stalled)
    assert "poll thread" in (channel.stalled() or "")
    producer.stuck.clear()
    producer.unstuck.set()
    wait_for(lambda: channel.stalled() is None)
    channel.close(timeout=0)
    assert channel.stalled() is None


# -- a producer stuck while the broker answers --------------------------------------------------

TIMED_OUT = KafkaError(KafkaError._MSG_TIMED_OUT)


def replaceable(producer: FakeProducer) -> tuple[KafkaChannel, list[tuple[str, Outcome]], list[FakeProducer]]:
    """A channel over ``producer`` whose replacements are new fakes (listed as they are made)."""
    channel, reports = channel_with(producer)
    made: list[FakeProducer] = []

    def new_producer(conf: dict[str, Any]) -> FakeProducer:
        made.append(FakeProducer())
        return made[-1]

    channel._new_producer = new_producer
    channel.check_every = 0  # ask the broker on every round
    return channel, reports, made


def test_a_producer_stuck_while_the_broker_answers_is_replaced(caplog: pytest.LogCaptureFixture) -> None:
    """Seen with tansu restarted on memory storage: every produce refused (unknown producer id),
    every record timed out, metadata fine. A record produced after the broker was seen up timed
    out too, and the broker still answers: a new producer takes over; what the old one held is
    reported RETRY once, and the worker's next attempt goes through the new one."""
    old = FakeProducer()
    channel, reports, made = replaceable(old)

    def report(m: Message, o: Outcome, r: str) -> None:
        reports.append((m.id, o))

    channel.publish([message(0, body="0"), message(1, body="1")], report)
    old.deliver(0, TIMED_OUT)
    channel._poll_once(old, 0)  # the broker answers: that alone proves nothing (it may just be back)
    assert made == [] and old.metadata_requests == 1
    channel.publish([message(2, body="2")], report)  # produced while the broker answers
    with caplog.at_level(logging.WARNING, logger="channels.kafka"):
        old.deliver(2, TIMED_OUT)
        channel._poll_once(old, 0)
    (new,) = made
    assert channel._producer is new and old.purged
    assert sorted(reports) == [("id-0", Outcome.RETRY), ("id-1", Outcome.RETRY), ("id-2", Outcome.RETRY)]
    assert any("Kafka producer replaced" in r.getMessage() for r in caplog.records)
    old.deliver(1)  # a late report of the old producer: ignored
    assert len(reports) == 3
    channel.publish([message(1, body="1")], report)
    assert [value for value, _ in new.callbacks] == [b"1"] and old.callbacks[-1][0] == b"2"
    new.deliver(0)
    assert reports[-1] == ("id-1", Outcome.ACK) and channel.pending == 0


def test_no_new_producer_while_the_broker_is_down() -> None:
    """Records time out because the broker is down: that is the circuit's business."""
    producer = FakeProducer()
    producer.broker_down = True
    channel, reports, made = replaceable(producer)
    for i in range(5):
        channel.publish([message(i)], lambda m, o, r: reports.append((m.id, o)))
        producer.deliver(i, TIMED_OUT)
        channel._poll_once(producer, 0)
    assert made == [] and producer.metadata_requests == 5
    assert [o for _, o in reports] == [Outcome.RETRY] * 5


def test_no_new_producer_when_records_get_through() -> None:
    """A broker that is slow for some records but delivers others: the producer works."""
    producer = FakeProducer()
    channel, reports, made = replaceable(producer)
    for i in range(0, 10, 2):
        channel.publish([message(i), message(i + 1)], lambda m, o, r: reports.append((m.id, o)))
        producer.deliver(i, TIMED_OUT)
        producer.deliver(i + 1)
        channel._poll_once(producer, 0)
    assert made == []


def test_no_new_producer_after_a_broker_outage_ends() -> None:
    """Records that timed out during an outage keep coming as the broker returns: it answers,
    but what was produced before that proves nothing; the next deliveries succeed."""
    producer = FakeProducer()
    producer.broker_down = True
    channel, reports, made = replaceable(producer)
    channel.publish([message(i) for i in range(4)], lambda m, o, r: reports.append((m.id, o)))
    producer.deliver(0, TIMED_OUT)
    channel._poll_once(producer, 0)
    producer.broker_down = False  # back, with its state
    producer.deliver(1, TIMED_OUT)
    channel._poll_once(producer, 0)
    producer.deliver(2, TIMED_OUT)  # produced before the broker was seen up
    channel._poll_once(producer, 0)
    producer.deliver(3)
    assert made == [] and reports[-1] == ("id-3", Outcome.ACK)


def test_the_stuck_producer_evidence() -> None:
    from channels.kafka.progress import ProducerProgress

    progress = ProducerProgress()
    assert progress.check() is None
    progress.failed(produced_at=1.0)
    token = progress.check()
    assert token is not None and not progress.answered(token, True, now=2.0)
    assert progress.answered_at == 2.0 and progress.check() is None
    progress.failed(produced_at=1.5)  # produced before the broker was seen up: asks again only
    assert not progress.answered(progress.check(), True, now=3.0)  # type: ignore[arg-type]
    progress.failed(produced_at=2.5)
    token = progress.check()
    assert token is not None
    progress.delivered()  # a delivery while the broker was asked: the answer counts for nothing
    assert not progress.answered(token, True, now=4.0) and progress.check() is None
    progress.failed(produced_at=5.0)
    assert not progress.answered(progress.check(), True, now=6.0)  # type: ignore[arg-type]
    progress.failed(produced_at=6.5)
    assert not progress.answered(progress.check(), False, now=9.0)  # type: ignore[arg-type]
    assert progress.answered_at is None  # down: start over
    progress.failed(produced_at=10.0)
    assert not progress.answered(progress.check(), True, now=11.0)  # type: ignore[arg-type]
    progress.failed(produced_at=12.0)
    assert progress.answered(progress.check(), True, now=13.0)  # type: ignore[arg-type]
    assert progress.check() is None and progress.answered_at is None


# -- MSK IAM ----------------------------------------------------------------------------------


def fake_signer(monkeypatch: pytest.MonkeyPatch, generate: Callable[[str], tuple[str, int]]) -> None:
    signer = types.ModuleType("aws_msk_iam_sasl_signer")
    signer.MSKAuthTokenProvider = types.SimpleNamespace(generate_auth_token=generate)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "aws_msk_iam_sasl_signer", signer)


def no_credentials(region: str) -> tuple[str, int]:
    raise RuntimeError("Unable to locate credentials.\nYou can configure credentials by running aws configure.")


def test_msk_token_failure_is_logged_in_one_line_and_raised(monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    fake_signer(monkeypatch, no_credentials)
    callback = msk_oauth_callback("eu-west-1")
    caplog.set_level(logging.INFO, logger="channels.kafka")
    for _ in range(2):  # librdkafka asks again every few seconds: one line, not one per ask
        with pytest.raises(RuntimeError):
            callback("")
    (record,) = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert record.levelno == logging.ERROR and record.exc_info is None
    assert "Unable to locate credentials" in record.getMessage() and "\n" not in record.getMessage()


def test_iam_needs_sasl_for_the_token_callback(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_signer(monkeypatch, lambda region: ("tok", 1_800_000_000_000))
    cfg = config(auth="iam", region="eu-west-1")
    assert cfg.create(SOURCE)._client_config()["oauth_cb"]("")[0] == "tok"
    # without SASL librdkafka never asks for a token, and each constructor would wait 10 s for one
    plain = config(auth="iam", region="eu-west-1", extra=(("security.protocol", "PLAINTEXT"),))
    assert "oauth_cb" not in plain.create(SOURCE)._client_config()


@pytest.mark.slow  # librdkafka's constructors wait their own 10 s for a token
def test_iam_token_failure_names_its_cause_for_producer_and_admin(monkeypatch: pytest.MonkeyPatch) -> None:
    """confluent-kafka's constructors wait 10 s for a token and then say only "OAuth token not set"."""
    fake_signer(monkeypatch, no_credentials)
    cfg = config(auth="iam", region="eu-west-1", bootstrap_servers="127.0.0.1:1", metadata_timeout=1)

    def start() -> str:
        with pytest.raises(ChannelError) as info:
            cfg.create(SOURCE).start()
        return str(info.value)

    def create_topic() -> str:
        channel = cfg.create(SOURCE)
        with pytest.raises(ChannelError) as info:
            channel._create_topic(channel._client_config())  # --kafka-create-topic's admin client
        return str(info.value)

    with ThreadPoolExecutor(2) as pool:  # both wait the same 10 s: side by side
        errors = [f.result() for f in [pool.submit(start), pool.submit(create_topic)]]
    for error in errors:
        assert "Unable to locate credentials" in error and "\n" not in error
    assert errors[0].startswith("cannot create the Kafka producer")
    assert errors[1].startswith("cannot create Kafka topic 'orders'")


def test_librdkafka_repeats_its_outage_lines_only_once_a_minute(caplog: pytest.LogCaptureFixture) -> None:
    from channels.kafka.channel import _LibrdkafkaLog

    sink = _LibrdkafkaLog()
    with caplog.at_level(logging.DEBUG, logger="channels.kafka.librdkafka"):
        for _ in range(5):
            sink.log(logging.ERROR, "FAIL [%s] Connect to %s failed", "rdkafka#producer-1", "127.0.0.1:9")
        sink.log(logging.ERROR, "FAIL [%s] Connect to %s failed", "rdkafka#producer-1", "127.0.0.1:8")
    levels = [(r.levelno, r.getMessage().rsplit(" ", 2)[0][-11:]) for r in caplog.records]
    assert [lvl for lvl, _ in levels] == [logging.ERROR] + [logging.DEBUG] * 4 + [logging.ERROR]


class FatalProducer(FakeProducer):
    """Its poll() raises a fatal error (seen: UNKNOWN_PRODUCER_ID after the broker restarted
    without its state) rather than handing it to error_cb."""

    def poll(self, timeout: float = 0) -> int:
        time.sleep(0.01)
        raise KafkaException(KafkaError(KafkaError.UNKNOWN_PRODUCER_ID, "unknown producer id", fatal=True))


def poll_until(channel: KafkaChannel, done: Callable[[], bool], timeout: float = 5.0) -> None:
    """Run the channel's poll thread until ``done`` (or ``timeout``), then stop it."""
    channel._start_polling()
    try:
        deadline = time.monotonic() + timeout
        while not done() and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        channel._stop.set()


def test_a_producer_whose_poll_raises_a_fatal_error_is_replaced() -> None:
    """Replaced as a stuck one is: what it held is reported RETRY, the new one takes the next."""
    producer, new = FatalProducer(), FakeProducer()
    channel, reports = channel_with(producer)
    channel._new_producer = lambda conf: new
    channel.publish([message(1)], lambda m, o, r: reports.append((m.id, o)))
    # The swap comes before the old producer's records are reported: wait for the report.
    poll_until(channel, lambda: bool(reports))
    assert channel._producer is new and channel._fatal is None
    assert reports == [("id-1", Outcome.RETRY)]


def test_a_fatal_error_poll_raises_fails_the_next_publish_when_no_new_producer_can_be_made() -> None:
    """The producer cannot be replaced: the error is recorded as error_cb's would be, so the next
    publish fails and the worker restarts with a new producer, instead of its circuit probing a
    dead producer for ever."""
    def cannot(conf: Any) -> Any:
        raise KafkaException(KafkaError(KafkaError._TRANSPORT, "no broker"))

    producer = FatalProducer()
    channel, reports = channel_with(producer)
    channel._new_producer = cannot
    poll_until(channel, lambda: channel._fatal is not None)
    assert channel._fatal is not None, "the poll thread did not record the fatal error"
    with pytest.raises(ChannelError, match="fatal"):
        channel.publish([message(1)], lambda m, o, r: reports.append((m.id, o)))
    assert reports == [("id-1", Outcome.RETRY)]
