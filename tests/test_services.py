"""The service manager starts real services, and stop() really ends them."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from poller.kit.installcache import install_once
from poller.kit.localkafka import tansu_s3_env
from poller.kit.localsqs import localstack_health, start_moto, start_sqs
from poller.kit.process import Service, ServiceError, free_port

from faultproxy import FaultProxy, SlowPaths
from support import consume_topic, drain_count, earliest_offsets, queue_counts, send_messages, wait_until


def _alive(pid: int) -> bool:
    """False once the process is gone or a zombie (an orphan waits for init to reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _wait_gone(pid: int, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _alive(pid)


def _create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(topic, partitions, 1)]).values():
        future.result(timeout=30)


def _produce(bootstrap: str, topic: str, n: int) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all"})
    errors: list[Any] = []
    for i in range(n):
        producer.produce(topic, key=str(i % 7), value=f"v{i}", on_delivery=lambda err, _m: err and errors.append(err))
    assert producer.flush(30) == 0
    assert errors == []


def _consume(bootstrap: str, topic: str, partitions: int, n: int, timeout: float = 30) -> list[bytes]:
    # assign() from offset 0 rather than subscribe(): group joins on tansu can hang after a restart.
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex, "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while len(got) < n and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                got.append(msg.value())
    finally:
        consumer.close()
    return got


# --------------------------------------------------------------------------- SQS


@pytest.mark.integration
def test_localstack_queue_round_trips_a_message(sqs_service: Service, sqs: Any, make_queue: Any) -> None:
    if sqs_service.pid is not None:
        assert sqs_service.running
    queue = make_queue()
    [message_id] = send_messages(sqs, queue.url, ["hello"])
    [msg] = sqs.receive_message(QueueUrl=queue.url, MaxNumberOfMessages=10, WaitTimeSeconds=5)["Messages"]
    assert (msg["MessageId"], msg["Body"]) == (message_id, "hello")
    sqs.delete_message(QueueUrl=queue.url, ReceiptHandle=msg["ReceiptHandle"])
    assert queue_counts(sqs, queue.url) == (0, 0)


@pytest.mark.integration
def test_send_messages_packs_batches_by_bytes(sqs: Any, make_queue: Any) -> None:
    queue = make_queue()
    bodies = [f"{i:04d}" + "x" * 100_000 for i in range(12)]  # two fit in 256 KiB, ten would not
    ids = send_messages(sqs, queue.url, bodies)
    assert len(set(ids)) == 12
    assert queue_counts(sqs, queue.url) == (12, 0)
    assert drain_count(sqs, queue.url) == 12


@pytest.mark.integration
def test_make_queue_fifo_with_dead_letter_queue(sqs: Any, make_queue: Any) -> None:
    queue = make_queue(fifo=True, visibility_timeout=5, dlq_max_receive_count=2)
    assert queue.url.endswith(".fifo") and queue.dlq_url is not None and queue.dlq_url.endswith(".fifo")
    attrs = sqs.get_queue_attributes(QueueUrl=queue.url, AttributeNames=["All"])["Attributes"]
    assert attrs["VisibilityTimeout"] == "5"
    assert queue.dlq_arn in attrs["RedrivePolicy"]
    assert len(send_messages(sqs, queue.url, ["a", "b", "c"])) == 3
    assert drain_count(sqs, queue.url) == 3


@pytest.mark.integration
def test_given_endpoint_is_only_checked(sqs_endpoint: str) -> None:
    with start_sqs(endpoint=sqs_endpoint) as service:
        assert (service.name, service.endpoint, service.pid) == ("external", sqs_endpoint, None)
    if localstack_health(sqs_endpoint) is not None:
        assert localstack_health(sqs_endpoint)["sqs"] in ("available", "running")  # type: ignore[index]


def test_unreachable_endpoint_is_one_clear_error() -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServiceError, match="nothing answers"):
        start_sqs(endpoint=endpoint)


@pytest.mark.integration
def test_moto_server_serves_sqs(tmp_path: Path) -> None:
    import boto3

    with start_moto(log_dir=tmp_path) as moto:
        sqs = boto3.client("sqs", endpoint_url=moto.endpoint, region_name="us-east-1")
        url = sqs.create_queue(QueueName="q")["QueueUrl"]
        send_messages(sqs, url, ["m"])
        assert drain_count(sqs, url) == 1
        pid = moto.pid
    assert pid is not None and not _alive(pid)


# --------------------------------------------------------------------------- tansu


@pytest.mark.integration
def test_tansu_round_trips_records(kafka_broker: str) -> None:
    topic = f"t-{uuid.uuid4().hex[:8]}"
    _create_topic(kafka_broker, topic, 3)
    _produce(kafka_broker, topic, 50)
    assert sorted(_consume(kafka_broker, topic, 3, 50)) == sorted(f"v{i}".encode() for i in range(50))


@pytest.mark.integration
def test_stop_kills_the_broker_and_is_idempotent(tansu_factory: Any) -> None:
    broker = tansu_factory()
    pid = broker.pid
    assert pid is not None and _alive(pid)
    broker.stop()
    assert not _alive(pid)
    broker.stop()
    port = int(broker.endpoint.rsplit(":", 1)[1])
    assert tansu_factory(port=port).endpoint == broker.endpoint  # the port is usable again at once


@pytest.mark.integration
def test_a_tansu_that_never_gets_ready_is_started_once_more(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from poller.kit import localkafka

    attempts: list[Path] = []

    def start(launch: Any, ready: Any, timeout: float, cleanup: Any) -> str:
        attempts.append(launch.log_path)
        if len(attempts) == 1:
            raise ServiceError("tansu on 127.0.0.1:1: not ready after 30 s")
        return "second"

    monkeypatch.setattr(localkafka, "tansu_binary", lambda cache_dir: tmp_path / "tansu")
    monkeypatch.setattr(localkafka, "start_process", start)
    assert localkafka.start_tansu(port=free_port(), log_dir=tmp_path) == "second"
    assert len(attempts) == 2 and attempts[0] != attempts[1]  # each start has its own log

    def never_ready(launch: Any, ready: Any, timeout: float, cleanup: Any) -> str:
        attempts.append(launch.log_path)
        raise ServiceError("tansu on 127.0.0.1:1: not ready after 30 s")

    attempts.clear()
    monkeypatch.setattr(localkafka, "start_process", never_ready)
    with pytest.raises(ServiceError, match="not ready"):
        localkafka.start_tansu(port=free_port(), log_dir=tmp_path)
    assert len(attempts) == 2  # twice at most


def test_tansu_on_s3_keeps_records_across_a_restart(sqs_service: Service, tansu_factory: Any) -> None:
    health = localstack_health(sqs_service.endpoint)
    if health is not None and health.get("s3") not in ("available", "running"):
        pytest.skip(f"the SQS endpoint has no S3 (s3: {health.get('s3')})")
    storage, env = tansu_factory.s3_storage()
    broker = tansu_factory(storage=storage, env=env)
    port = int(broker.endpoint.rsplit(":", 1)[1])
    _create_topic(broker.endpoint, "durable", 3)
    _produce(broker.endpoint, "durable", 100)
    broker.stop()
    time.sleep(1)
    again = tansu_factory(port=port, storage=storage, env=env)
    assert len(_consume(again.endpoint, "durable", 3, 100)) == 100


def test_counts_read_from_offset_0_since_tansu_earliest_follows_write_order(
    sqs_service: Service, tansu_factory: Any,
) -> None:
    """tansu answers ListOffsets(earliest) with the batch it *wrote* first. Here the S3 write of
    the batch at offset 0 is held 2 s, so the one at offset 10 is written first: every record is
    acked, a reader from OFFSET_BEGINNING starts at 10, and the suite's count (from offset 0
    itself) still finds all 20. On the memory engine the same happens when two producers race for
    a partition's first offsets; it is why ``consume_topic`` does not use OFFSET_BEGINNING."""
    health = localstack_health(sqs_service.endpoint)
    if health is not None and health.get("s3") not in ("available", "running"):
        pytest.skip(f"the SQS endpoint has no S3 (s3: {health.get('s3')})")
    storage, _ = tansu_factory.s3_storage()
    with FaultProxy(sqs_service.endpoint, http=True) as s3_proxy:
        s3_proxy.set(SlowPaths("PUT", "/records/00000000000000000000.batch", 2.0))
        broker = tansu_factory(storage=storage, env=tansu_s3_env(s3_proxy.url))
        _create_topic(broker.endpoint, "raced", 1)
        conf = {"bootstrap.servers": broker.endpoint, "enable.idempotence": True, "acks": "all"}
        first, second = Producer(conf), Producer(conf)
        errors: list[Any] = []
        for producer in (first, second):
            producer.list_topics("raced", timeout=10)  # connected: the produce goes out at once
        for i in range(10):
            first.produce("raced", f"first-{i}", partition=0, on_delivery=lambda err, _m: errors.append(err))
        first.poll(0)
        wait_until(lambda: bool(s3_proxy.stats().slowed), 10, "the write of offset 0 to be held")
        for i in range(10):
            second.produce("raced", f"second-{i}", partition=0, on_delivery=lambda err, _m: errors.append(err))
        assert second.flush(15) == 0 and first.flush(15) == 0
        assert errors == [None] * 20
        assert earliest_offsets(broker.endpoint, "raced") == {0: 10}
        counted = consume_topic(broker.endpoint, "raced", lambda records: len(records) >= 20, timeout=20, settle=1)
        assert sorted(r.value().decode() for r in counted) == sorted(
            [f"first-{i}" for i in range(10)] + [f"second-{i}" for i in range(10)])


# --------------------------------------------------------------------------- process and install plumbing


_STUBBORN = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c",
                          "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
print(child.pid, flush=True)
time.sleep(60)
"""


def test_stop_escalates_to_sigkill_for_the_whole_group(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _STUBBORN], stdout=subprocess.PIPE, start_new_session=True
    )
    assert proc.stdout is not None
    child_pid = int(proc.stdout.readline())
    service = Service("stubborn", "-", proc, grace=0.5)
    started = time.monotonic()
    service.stop()
    assert time.monotonic() - started < 5
    assert proc.returncode == -signal.SIGKILL
    assert _wait_gone(child_pid)


_OWNER = """
import sys
from poller.kit.localkafka import start_tansu
broker = start_tansu(log_dir=sys.argv[1])
print(broker.pid, flush=True)
input()  # never stops the broker itself: it is SIGKILLed while waiting here
"""


@pytest.mark.integration
def test_services_die_with_an_owner_killed_before_stop(tmp_path: Path) -> None:
    owner = subprocess.Popen([sys.executable, "-c", _OWNER, str(tmp_path)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert owner.stdout is not None
    try:
        broker_pid = int(owner.stdout.readline())
        assert _alive(broker_pid)
    finally:
        owner.kill()
        owner.wait()
    assert _wait_gone(broker_pid)


def test_install_once_redoes_a_half_finished_install(tmp_path: Path) -> None:
    dest = tmp_path / "thing"
    calls: list[int] = []

    def broken(d: Path) -> None:
        (d / "half").write_text("x")
        raise ServiceError("network gone")

    def good(d: Path) -> None:
        calls.append(1)
        (d / "bin").write_text("ok")

    with pytest.raises(ServiceError):
        install_once(dest, "v1", broken)
    install_once(dest, "v1", good)
    install_once(dest, "v1", good)
    assert calls == [1] and not (dest / "half").exists() and (dest / "bin").read_text() == "ok"
    install_once(dest, "v2", good)  # new pins reinstall
    assert calls == [1, 1]


def test_install_once_lets_one_installer_run_at_a_time(tmp_path: Path) -> None:
    dest = tmp_path / "thing"
    running = 0
    overlaps: list[int] = []
    calls: list[int] = []

    def slow(d: Path) -> None:
        nonlocal running
        running += 1
        overlaps.append(running)
        time.sleep(0.3)
        calls.append(1)
        running -= 1

    # flock excludes separate open file descriptions, so threads stand in for processes here.
    threads = [threading.Thread(target=install_once, args=(dest, "v1", slow)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [1] and overlaps == [1]
