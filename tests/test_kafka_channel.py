"""KafkaChannel against a real Kafka-protocol broker (tansu), read back and judged by the cloudevents SDK."""

from __future__ import annotations

import base64
import logging
import os
import socket
import struct
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from cloudevents.core.bindings import kafka as ce_kafka
from confluent_kafka import TIMESTAMP_CREATE_TIME, Consumer, KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from channels.base import ChannelError, Message, Outcome
from channels.kafka import KafkaChannel, KafkaConfig

from support import consume_topic

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


def now_ms() -> int:
    return int(time.time() * 1000)


def random_body(size: int) -> str:
    """Base64 of random bytes: lz4 (the default compression) cannot shrink it much."""
    return base64.b64encode(os.urandom(size * 3 // 4)).decode()


# -- a broker that enforces max.message.bytes (tansu stores the setting but ignores it) -------

PRODUCE, METADATA, API_VERSIONS = 0, 3, 18
MESSAGE_TOO_LARGE = 10
PRODUCE_MAX_VERSION = 7  # the last one without tagged fields: simple to read and answer


def _read_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = sock.recv(n - len(buf))
        except OSError:
            return None
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _read_frame(sock: socket.socket) -> bytes | None:
    head = _read_exact(sock, 4)
    return None if head is None else _read_exact(sock, struct.unpack(">i", head)[0])


class _Reader:
    """Just enough of the Kafka wire format to find fields in a frame."""

    def __init__(self, buf: bytes | bytearray, pos: int) -> None:
        self.buf, self.pos = buf, pos

    def int(self, fmt: str) -> int:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return int(value)

    def string(self) -> bytes:
        n = max(self.int(">h"), 0)
        self.pos += n
        return bytes(self.buf[self.pos - n:self.pos])

    def uvarint(self) -> int:
        value = shift = 0
        while True:
            byte = self.buf[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7

    def skip_compact_string(self) -> None:
        n = self.uvarint() - 1  # first: "self.pos += self.uvarint()" would read pos before it moves
        self.pos += max(n, 0)

    def skip_tags(self) -> None:
        for _ in range(self.uvarint()):
            self.uvarint()
            n = self.uvarint()
            self.pos += n


class SizeLimitProxy:
    """A Kafka-protocol proxy in front of tansu that answers MESSAGE_TOO_LARGE for a produce
    request whose record batch is over ``limit`` bytes, as Kafka does for a topic's
    ``max.message.bytes``; ``frozen`` stops all traffic (a broker that is up but stuck).

    It caps Produce at v7 (ApiVersions) to parse it simply, and points the brokers of Metadata
    responses at itself. librdkafka sends one partition's batch per produce request.
    """

    def __init__(self, upstream: str, limit: int) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.limit = limit
        self.refused = 0
        self.frozen = threading.Event()
        self.closed = threading.Event()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.closed.set()
        self._server.close()
        for sock in self._sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def wait_if_frozen(self) -> None:
        while self.frozen.is_set() and not self.closed.is_set():
            time.sleep(0.05)

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self._server.accept()
                broker = socket.create_connection(self.upstream)
            except OSError:
                continue
            self._sockets += [client, broker]
            _ProxyConnection(self, client, broker)


class _ProxyConnection:
    def __init__(self, proxy: SizeLimitProxy, client: socket.socket, broker: socket.socket) -> None:
        self.proxy, self.client, self.broker = proxy, client, broker
        self.lock = threading.Lock()
        # Requests in order: (correlation id, api key, version, our own answer or None).
        self.queue: deque[tuple[int, int, int, bytes | None]] = deque()
        threading.Thread(target=self._pump, args=(self._requests,), daemon=True).start()
        threading.Thread(target=self._pump, args=(self._responses,), daemon=True).start()

    def _pump(self, loop: Callable[[], None]) -> None:
        try:
            loop()
        except OSError:
            pass  # a side hung up, or the proxy was closed
        finally:
            for sock in (self.client, self.broker):
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # the other direction ends too
                except OSError:
                    pass

    def _requests(self) -> None:
        while (frame := _read_frame(self.client)) is not None:
            self.proxy.wait_if_frozen()
            key, version, corr = struct.unpack_from(">hhi", frame)
            answer = self._refuse_if_too_large(frame, corr) if key == PRODUCE else None
            with self.lock:  # answers go back in request order, ours among the broker's
                self.queue.append((corr, key, version, answer))
                if answer is None:
                    self.broker.sendall(struct.pack(">i", len(frame)) + frame)
                self._send_own_answers()

    def _responses(self) -> None:
        while (frame := _read_frame(self.broker)) is not None:
            self.proxy.wait_if_frozen()
            with self.lock:
                corr, key, version, _ = self.queue.popleft()
                assert struct.unpack_from(">i", frame)[0] == corr
                if key == API_VERSIONS:
                    frame = self._cap_produce_version(frame, version)
                elif key == METADATA:
                    frame = self._point_brokers_here(frame, version)
                self.client.sendall(struct.pack(">i", len(frame)) + frame)
                self._send_own_answers()

    def _send_own_answers(self) -> None:
        while self.queue and self.queue[0][3] is not None:
            answer = self.queue.popleft()[3]
            assert answer is not None
            self.client.sendall(struct.pack(">i", len(answer)) + answer)

    def _refuse_if_too_large(self, frame: bytes, corr: int) -> bytes | None:
        r = _Reader(frame, 8)
        r.string()  # client id
        r.string()  # transactional id
        r.int(">h"), r.int(">i")  # acks, timeout
        topics, too_large = [], False
        for _ in range(r.int(">i")):
            name, partitions = r.string(), []
            for _ in range(r.int(">i")):
                partitions.append(r.int(">i"))
                size = r.int(">i")
                r.pos += max(size, 0)
                too_large |= size > self.proxy.limit
            topics.append((name, partitions))
        if not too_large:
            return None
        self.proxy.refused += 1
        out = [struct.pack(">ii", corr, len(topics))]
        for name, partitions in topics:
            out.append(struct.pack(">h", len(name)) + name + struct.pack(">i", len(partitions)))
            out += [struct.pack(">ihqqq", p, MESSAGE_TOO_LARGE, -1, -1, -1) for p in partitions]
        out.append(struct.pack(">i", 0))  # throttle time
        return b"".join(out)

    @staticmethod
    def _cap_produce_version(frame: bytes, version: int) -> bytes:
        buf = bytearray(frame)
        r = _Reader(buf, 4)
        if r.int(">h") != 0:
            return frame
        flexible = version >= 3
        for _ in range(r.uvarint() - 1 if flexible else r.int(">i")):
            api = r.int(">h")
            r.int(">h")
            if api == PRODUCE:
                struct.pack_into(">h", buf, r.pos, min(PRODUCE_MAX_VERSION, struct.unpack_from(">h", buf, r.pos)[0]))
            r.int(">h")
            if flexible:
                r.skip_tags()
        return bytes(buf)

    def _point_brokers_here(self, frame: bytes, version: int) -> bytes:
        buf = bytearray(frame)
        flexible = version >= 9
        r = _Reader(buf, 4)
        if flexible:
            r.skip_tags()  # response header v1
        if version >= 3:
            r.int(">i")  # throttle time
        for _ in range(r.uvarint() - 1 if flexible else r.int(">i")):
            r.int(">i")  # node id
            r.skip_compact_string() if flexible else r.string()  # host: the same 127.0.0.1
            struct.pack_into(">i", buf, r.pos, self.proxy.port)
            r.int(">i")
            if version >= 1:
                r.skip_compact_string() if flexible else r.string()  # rack
            if flexible:
                r.skip_tags()
        return bytes(buf)


@pytest.fixture
def size_proxy(bootstrap: str) -> Iterator[Any]:
    proxies: list[SizeLimitProxy] = []

    def make(limit: int = 1 << 30) -> SizeLimitProxy:
        proxies.append(SizeLimitProxy(bootstrap, limit))
        return proxies[-1]

    yield make
    for proxy in proxies:
        proxy.close()


def create_topic(bootstrap: str, partitions: int) -> str:
    topic = topic_name()
    admin = AdminClient({"bootstrap.servers": bootstrap, "logger": log})
    admin.create_topics([NewTopic(topic, partitions, 1)])[topic].result(15)
    return topic


def create_topic_named(bootstrap: str, topic: str, partitions: int) -> None:
    """``topic`` on a broker that forgot it; a producer's metadata request may have made tansu
    create it already (auto-create), which is as good."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "logger": log})
    try:
        admin.create_topics([NewTopic(topic, partitions, 1)])[topic].result(15)
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise


# -- tests ------------------------------------------------------------------------------------


def test_binary_events_round_trip(bootstrap: str) -> None:
    topic, n = topic_name(), 500
    channel = make_channel(bootstrap, topic, partitions=3)
    reports = Reports()
    messages = [msg(i, tenant={"DataType": "String", "StringValue": f"t{i % 3}"}) for i in range(n)]
    produced_from = now_ms()
    for start in range(0, n, 10):
        channel.publish(messages[start:start + 10], reports)
    reports.wait(n)
    produced_to = now_ms()
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
        # the produce time (retention goes by it); SentTimestamp stays in ce_time
        assert record.timestamp()[0] == TIMESTAMP_CREATE_TIME
        assert produced_from - 1000 <= record.timestamp()[1] <= produced_to + 1000 and record.key() is None
        assert dict(record.headers())["tenant"] == f"t{i % 3}".encode()


def test_debug_log_names_where_each_message_went(bootstrap: str, caplog: pytest.LogCaptureFixture) -> None:
    """At DEBUG, each delivered message's partition and offset: what an operator needs to find a
    message in the topic, checked against where the records really are."""
    topic, n = topic_name(), 20
    channel = make_channel(bootstrap, topic, partitions=3)
    reports = Reports()
    with caplog.at_level(logging.DEBUG, logger="channels.kafka"):
        channel.publish([msg(i) for i in range(n)], reports)
        reports.wait(n)
    channel.close(5)
    logged = {record.args[0]: record.args[1:] for record in caplog.records  # type: ignore[index]
              if record.msg == "message %s delivered to partition %s at offset %s"}
    stored = {ce_kafka.from_binary_event(as_kafka_message(r)).get_id(): (r.partition(), r.offset())
              for r in consume(bootstrap, topic, n)}
    assert len(stored) == n and logged == stored


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
    channel = make_channel(bootstrap, topic, format="raw", key="attribute:tenant", timestamp="sent")
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


def test_an_oversized_record_is_rejected_and_its_group_mates_land_in_order(bootstrap: str) -> None:
    """The channel reports each record; a group's order in Kafka is produce order (one partition,
    idempotent producer). What to do with a group after a failure is the worker's to decide."""
    topic = topic_name()
    channel = make_channel(bootstrap, topic)
    reports = Reports()
    batch = [msg(0, group="a", body="a0"), msg(1, group="b", body="b0"), msg(2, group="a", body="x" * 1_100_000),
             msg(3, group="a", body="a2"), msg(4, group="b", body="b1"), msg(5, group="a", body="a3")]
    channel.publish(batch, reports)
    reports.wait(6)
    channel.close(5)
    assert reports.outcomes() == {"m-0": Outcome.ACK, "m-1": Outcome.ACK, "m-2": Outcome.REJECT,
                                  "m-3": Outcome.ACK, "m-4": Outcome.ACK, "m-5": Outcome.ACK}
    records = consume(bootstrap, topic, 5)
    bodies = [ce_kafka.from_binary_event(as_kafka_message(r)).get_data()["Body"] for r in records]
    assert [b for b in bodies if b.startswith("a")] == ["a0", "a2", "a3"]
    assert sorted(bodies) == ["a0", "a2", "a3", "b0", "b1"]


def test_close_reports_undelivered_as_retry_once(tansu_factory: Any) -> None:
    broker = tansu_factory()  # a broker of this test's own: it gets stopped
    channel = make_channel(broker.endpoint, topic_name())
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


@pytest.mark.parametrize("replication", [-1, 1])
def test_create_topic_with_the_brokers_replication_or_a_given_one(bootstrap: str, replication: int) -> None:
    # -1, the default (no --kafka-replication): the broker's default.replication.factor (KIP-464).
    assert KafkaConfig(bootstrap_servers=bootstrap, topic="t").replication == -1
    topic = topic_name()
    make_channel(bootstrap, topic, partitions=2, replication=replication).close()
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "x", "logger": log})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    finally:
        consumer.close()
    assert len(partitions) == 2
    assert all(len(p.replicas) == 1 for p in partitions.values()), {n: p.replicas for n, p in partitions.items()}


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
    assert set(reports.outcomes().values()) == {Outcome.ACK}  # speed is measured in benchmarks/


def test_batch_refused_as_too_large_is_sent_again_record_by_record(bootstrap: str, size_proxy: Any) -> None:
    """A topic's max.message.bytes below the producer's batch size: the broker refuses the whole
    batch and librdkafka fails each of its records with MSG_SIZE_TOO_LARGE."""
    proxy = size_proxy(limit=4000)  # one ~1 KB record fits, ten do not
    topic = create_topic(bootstrap, partitions=1)  # one partition: every record in one batch
    channel = make_channel(proxy.endpoint, topic, extra=(("linger.ms", "200"),))
    reports = Reports()
    standard = [msg(i, body=random_body(600)) for i in range(6)]
    fifo = [msg(10, group="a", body="a0"), msg(11, group="a", body=random_body(8000)),
            msg(12, group="a", body="a2"), msg(13, group="b", body="b0"), msg(14, group="b", body="b1")]
    channel.publish(standard + fifo, reports)
    reports.wait(11)
    channel.close(5)
    assert proxy.refused >= 2  # the batch, then m-11 on its own
    outcomes = reports.outcomes()
    assert outcomes.pop("m-11") is Outcome.REJECT and "too large" in reports.seen["m-11"][1].lower()
    # Sent again alone, a record with a later one of its group in the same publish may be behind
    # it in Kafka: RETRY, so the worker sends both again in order. Every other one is delivered.
    retried = {i for i, o in outcomes.items() if o is Outcome.RETRY}
    assert retried <= {"m-10", "m-13"}, retried
    assert {i for i, o in outcomes.items() if o is Outcome.ACK} == set(outcomes) - retried
    assert not reports.duplicates

    records = consume(bootstrap, topic, 10)
    ids = {ce_kafka.from_binary_event(as_kafka_message(r)).get_id() for r in records}
    assert ids == {m.id for m in standard + fifo} - {"m-11"}


def test_close_ends_a_full_queue_wait_on_a_stuck_broker(bootstrap: str, size_proxy: Any) -> None:
    proxy = size_proxy()
    channel = make_channel(proxy.endpoint, topic_name(), extra=(("queue.buffering.max.messages", "5"),))
    reports = Reports()
    channel.publish([msg(0)], reports)
    reports.wait(1)
    proxy.frozen.set()  # up, connected, and never answering
    batch = [msg(i) for i in range(1, 21)]
    publisher = threading.Thread(target=channel.publish, args=(batch, reports), daemon=True)
    publisher.start()
    time.sleep(0.5)  # the queue fills; publish waits for room
    started = time.monotonic()
    channel.close(timeout=2)
    assert time.monotonic() - started < 5  # 2 s plus a fraction; loose for a busy machine
    publisher.join(5)
    assert not publisher.is_alive()
    assert len(reports.seen) == 21 and not reports.duplicates
    outcomes = reports.outcomes()
    assert outcomes.pop("m-0") is Outcome.ACK and set(outcomes.values()) == {Outcome.RETRY}
    time.sleep(0.5)
    assert len(reports.order) == 21  # nothing reported after close


def test_a_producer_stuck_after_the_broker_lost_its_state_is_replaced(
    tansu_factory: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    """tansu on memory storage restarted on the same port: it has forgotten the producer's id and
    answers each produce UNKNOWN_PRODUCER_ID, and librdkafka (reading that as expired state) bumps
    its epoch and sends again until message.timeout.ms, for good, while metadata works. The
    channel replaces its producer: the messages, retried as the worker retries them, all arrive,
    and each attempt reports each message once."""
    broker = tansu_factory()
    port = int(broker.endpoint.rsplit(":", 1)[1])
    topic = topic_name()
    channel = make_channel(broker.endpoint, topic, partitions=3, extra=(("message.timeout.ms", "1500"),))
    first = Reports()
    channel.publish([msg(0)], first)
    first.wait(1)
    assert first.outcomes() == {"m-0": Outcome.ACK}
    broker.stop()
    broker = tansu_factory(port=port)  # no topic, no producer ids
    create_topic_named(broker.endpoint, topic, partitions=3)
    todo = {f"m-{i}": msg(i) for i in range(1, 31)}
    delivered: set[str] = set()
    attempts = 0
    deadline = time.monotonic() + 40
    with caplog.at_level(logging.WARNING, logger="channels.kafka"):
        while todo.keys() - delivered and time.monotonic() < deadline:  # the worker's retries, in short
            attempts += 1
            batch = [todo[i] for i in sorted(todo.keys() - delivered)]
            reports = Reports()
            channel.publish(batch, reports)
            reports.wait(len(batch), timeout=10)
            assert not reports.duplicates and len(reports.order) == len(batch)
            delivered |= {i for i, outcome in reports.outcomes().items() if outcome is Outcome.ACK}
            time.sleep(0.2)
    channel.close(5)
    assert delivered == todo.keys(), f"{len(todo.keys() - delivered)} never delivered in {attempts} attempts"
    assert any("Kafka producer replaced" in r.getMessage() for r in caplog.records)
    records = consume(broker.endpoint, topic, len(todo))
    assert {ce_kafka.from_binary_event(as_kafka_message(r)).get_id() for r in records} == todo.keys()
