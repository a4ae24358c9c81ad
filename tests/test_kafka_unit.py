"""The Kafka channel's pure parts: config validation, record building, ack/FIFO settlement.

No broker: records are checked with the cloudevents SDK's Kafka binding, and the settlement logic
runs against a fake producer whose delivery reports the test fires in any order.
"""

from __future__ import annotations

import base64
import pickle
import sys
import types
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from cloudevents.core.bindings import kafka as ce_kafka
from confluent_kafka import KafkaError, KafkaException

from channels.base import ChannelError, Message, Outcome
from channels.kafka import (
    DEFAULTS,
    KafkaChannel,
    KafkaConfig,
    RecordBuilder,
    msk_oauth_callback,
    parse_kafka_config,
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
    assert conf["compression.type"] == "lz4" and conf["linger.ms"] == 5
    assert config(extra=(("linger.ms", "50"), ("compression.type", "zstd"))).producer_config()["linger.ms"] == "50"
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
        ({"auth": "kerberos"}, "Kafka auth"),
        ({"topic": "bad topic"}, "topic name"),
        ({"bootstrap_servers": " "}, "bootstrap"),
        ({"partitions": 0}, "partitions"),
        ({"replication": 0}, "replication"),
        ({"extra": (("foo.bar", "1"),)}, 'No such configuration property: "foo.bar"'),
        ({"extra": (("acks", "banana"),)}, "Invalid value"),
        ({"extra": (("acks", "1"),)}, "enable.idempotence"),
        ({"extra": (("error_cb", "x"),)}, "cannot be set"),
    ],
)
def test_bad_config_is_a_one_line_value_error(kw: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        config(**kw)
    text = str(info.value)
    assert fragment in text and "\n" not in text


def test_idempotence_can_be_turned_off_by_the_user() -> None:
    assert config(extra=(("enable.idempotence", "false"), ("acks", "1"))).producer_config()["acks"] == "1"


def test_parse_kafka_config() -> None:
    assert parse_kafka_config(["linger.ms=20", "client.id=a=b"]) == (("linger.ms", "20"), ("client.id", "a=b"))
    for bad in ("linger.ms", "=5"):
        with pytest.raises(ValueError, match="KEY=VALUE"):
            parse_kafka_config([bad])


# -- records ----------------------------------------------------------------------------------


def test_binary_record_parses_with_the_sdk() -> None:
    msg = message(group="g1", tenant={"DataType": "String", "StringValue": "acme"},
                  blob={"DataType": "Binary", "BinaryValue": "AAE="})  # base64, as SQS's JSON protocol gives it
    record = RecordBuilder(config(overrides={"env": "prod"}), SOURCE).build(msg)
    event = ce_kafka.from_binary_event(kmsg(record))
    assert event.get_id() == "id-1" and event.get_source() == SOURCE
    assert event.get_type() == "aws.sqs.message"
    assert event.get_time() == datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=UTC)
    assert event.get_extension("tenant") == "acme" and event.get_extension("env") == "prod"
    assert event.get_extension("partitionkey") == "g1"
    assert event.get_datacontenttype() == "application/json"
    assert event.get_data()["Body"] == '{"n": 1}' and event.get_data()["MessageId"] == "id-1"
    headers = dict(record.headers)
    assert headers["tenant"] == b"acme" and headers["blob"] == b"\x00\x01"
    assert record.key == b"g1" and record.timestamp == 1700000000123


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
    assert record.timestamp == 1700000000123


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


def test_msk_without_the_extra_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "aws_msk_iam_sasl_signer", None)  # import fails
    with pytest.raises(ChannelError, match=r"poller\[msk\]"):
        msk_oauth_callback("eu-west-1")


def test_scram_needs_credentials_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KAFKA_SASL_USERNAME", raising=False)
    monkeypatch.delenv("KAFKA_SASL_PASSWORD", raising=False)
    with pytest.raises(ChannelError, match="KAFKA_SASL_USERNAME"):
        config(auth="scram-sha-512").create(SOURCE).start()


# -- settlement (fake producer) ---------------------------------------------------------------


class FakeProducer:
    """Records produce() calls; the test fires their delivery reports."""

    def __init__(self, fail_sync: Callable[[bytes], KafkaError | None] = lambda v: None) -> None:
        self.callbacks: list[tuple[bytes, Callable[[KafkaError | None, Any], None]]] = []
        self.fail_sync = fail_sync
        self.buffer_full = 0

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
        return 0

    def flush(self, timeout: float = 0) -> int:
        return len(self.callbacks)

    def purge(self) -> None:
        pass

    def deliver(self, index: int, err: KafkaError | None = None) -> None:
        self.callbacks[index][1](err, None)


def channel_with(producer: FakeProducer, **kw: Any) -> tuple[KafkaChannel, list[tuple[str, Outcome]]]:
    channel = config(format="raw", **kw).create(SOURCE)
    channel._producer = producer  # type: ignore[assignment]  # skip start(): no broker here
    reports: list[tuple[str, Outcome]] = []
    return channel, reports


def test_standard_messages_are_reported_as_their_reports_arrive() -> None:
    producer = FakeProducer()
    channel, reports = channel_with(producer)
    channel.publish([message(i, body=str(i)) for i in range(3)], lambda m, o, r: reports.append((m.id, o)))
    producer.deliver(2)
    producer.deliver(0, KafkaError(KafkaError._MSG_TIMED_OUT))
    producer.deliver(1, KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
    assert reports == [("id-2", Outcome.ACK), ("id-0", Outcome.RETRY), ("id-1", Outcome.REJECT)]
    assert channel.pending == 0


def test_fifo_group_is_held_and_settled_in_order_after_a_failure() -> None:
    producer = FakeProducer()
    channel, reports = channel_with(producer)
    batch = [message(0, group="a"), message(1, group="b"), message(2, group="a"), message(3, group="a")]
    channel.publish(batch, lambda m, o, r: reports.append((m.id, o)))
    producer.deliver(3)  # a's last, delivered first: held
    producer.deliver(1)  # b alone: reported at once
    assert reports == [("id-1", Outcome.ACK)]
    producer.deliver(0)
    assert len(reports) == 1  # a still waits for id-2
    producer.deliver(2, KafkaError(KafkaError.NOT_ENOUGH_REPLICAS))
    assert reports[1:] == [("id-0", Outcome.ACK), ("id-2", Outcome.RETRY), ("id-3", Outcome.RETRY)]


def test_sync_failure_stops_the_rest_of_the_group_from_being_produced() -> None:
    big = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)
    producer = FakeProducer(fail_sync=lambda value: big if value == b"big" else None)
    channel, reports = channel_with(producer)
    batch = [message(0, group="a", body="ok"), message(1, group="a", body="big"),
             message(2, group="a", body="later"), message(3, body="other")]
    channel.publish(batch, lambda m, o, r: reports.append((m.id, o)))
    assert [value for value, _ in producer.callbacks] == [b"ok", b"other"]  # "later" never produced
    producer.deliver(1)
    producer.deliver(0)
    assert reports == [("id-3", Outcome.ACK), ("id-0", Outcome.ACK), ("id-1", Outcome.REJECT),
                       ("id-2", Outcome.RETRY)]


def test_buffer_full_waits_and_retries() -> None:
    producer = FakeProducer()
    producer.buffer_full = 3
    channel, reports = channel_with(producer)
    channel.publish([message(0)], lambda m, o, r: reports.append((m.id, o)))
    assert len(producer.callbacks) == 1
    producer.deliver(0)
    assert reports == [("id-0", Outcome.ACK)]


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
