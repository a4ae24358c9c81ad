"""End to end: real LocalStack SQS -> the real ``poller run --channel kafka`` (processes,
supervisor) -> a real Kafka-protocol broker (tansu).

Nothing is faked. What reached Kafka is read back by consuming every partition from offset 0 with
``assign()`` (never counted with watermarks: tansu's are not exact, see ../shared/SERVICES.md) and
judged by the cloudevents SDK's Kafka binding.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from cloudevents.core.bindings import kafka as ce_kafka
from confluent_kafka.admin import AdminClient
from support import (
    PollerProcess,
    ce_id,
    consume_topic,
    drain,
    free_port,
    has_ids,
    make_body,
    new_topic,
    poller_cpu,
    queue_counts,
    send_messages,
    send_parallel,
    silent_server,
    split,
    wait_empty, wait_until,
)

pytestmark = pytest.mark.integration
log = logging.getLogger(__name__)



# -- helpers ------------------------------------------------------------------------------


def poller_args(queue_url: str, bootstrap: str, topic: str, *extra: str) -> list[str]:
    return [
        "--queue-url", queue_url, "--channel", "kafka", "--kafka-bootstrap-servers", bootstrap,
        "--kafka-topic", topic, "--processes", "2", "--wait-time", "1", "--stats-interval", "2",
        "--shutdown-timeout", "20", *extra,
    ]
















def remaining(sqs: Any, url: str) -> int:
    return sum(queue_counts(sqs, url))


# -- 1. volume ----------------------------------------------------------------------------


def test_10000_messages_reach_kafka_exactly_once(
    sqs: Any, make_queue: Any, aws_env: dict[str, str], kafka_broker: str, tmp_path: Path
) -> None:
    n = 10_000
    queue = make_queue(visibility_timeout=60)
    topic = new_topic(kafka_broker, partitions=3)
    rng = random.Random(n)
    entries: list[dict[str, Any]] = []
    for i in range(n):
        entry: dict[str, Any] = {"MessageBody": make_body(int(10 ** rng.uniform(0, 3.3)))}
        if i % 3 == 0:
            entry["MessageAttributes"] = {
                "trace": {"DataType": "String", "StringValue": f"t-{i} ü"},
                "amount": {"DataType": "Number", "StringValue": str(i)},
            }
        entries.append(entry)
    ids = [mid for chunk in send_parallel(sqs, queue.url, split(entries, 20)) for mid in chunk]
    assert len(set(ids)) == n
    assert remaining(sqs, queue.url) == n

    poller = PollerProcess(poller_args(queue.url, kafka_broker, topic), aws_env, tmp_path / "poller.log")
    try:
        started = time.monotonic()
        poller.wait_for_workers(2)
        ready = time.monotonic()
        cpu_ready = poller_cpu(poller)
        left_at_ready = remaining(sqs, queue.url)
        wait_until(lambda: remaining(sqs, queue.url) == 0, 240, "the queue to be empty", interval=0.1)
        done = time.monotonic()
        cpu_done = poller_cpu(poller)  # just before stopping
    finally:
        code = poller.stop()
    assert code == 0, poller.log_text()[-3000:]

    records = consume_topic(kafka_broker, topic, lambda rs: len(rs) >= n)
    counts = Counter(ce_id(r) for r in records)
    duplicates = {i: c for i, c in counts.items() if c > 1}
    print(f"\nSQS -> poller (2 processes) -> Kafka, {n} messages: "
          f"{n / (done - started):.0f} msg/s from the poller's start, "
          f"{left_at_ready / (done - ready):.0f} msg/s once both workers were up "
          f"({left_at_ready} messages in {done - ready:.2f} s); "
          f"poller CPU {cpu_done / n * 1e6:.0f} us/msg with start-up, "
          f"{(cpu_done - cpu_ready) / max(left_at_ready, 1) * 1e6:.0f} us/msg after it "
          f"(supervisor + workers, utime+stime)")
    assert set(counts) == set(ids), f"missing {len(set(ids) - set(counts))}, unexpected {len(set(counts) - set(ids))}"
    assert not duplicates, f"{len(duplicates)} MessageIds in Kafka more than once"
    assert len(records) == n
    assert queue_counts(sqs, queue.url) == (0, 0)

    by_id = dict(zip(ids, entries))
    partitions = Counter(r.partition() for r in records)
    assert len(partitions) == 3, f"records not spread over the partitions: {partitions}"
    for record in records:
        event = ce_kafka.from_binary_event(
            ce_kafka.KafkaMessage(headers=dict(record.headers() or []), key=record.key(), value=record.value())
        )
        sent = by_id[event.get_id()]
        assert event.get_type() == "aws.sqs.message"
        assert event.get_source() == queue.url
        assert event.get_time() is not None
        assert record.key() is None  # standard queue: no key
        data = event.get_data()
        assert isinstance(data, dict)
        assert data["MessageId"] == event.get_id()
        assert data["Body"] == sent["MessageBody"]
        # The produce time (retention goes by it), not SentTimestamp, which ce_time carries.
        assert record.timestamp()[1] >= int(data["Attributes"]["SentTimestamp"])
        assert event.get_time() is not None
        if "MessageAttributes" in sent:
            assert event.get_extension("trace") == sent["MessageAttributes"]["trace"]["StringValue"]
            assert dict(record.headers())["amount"] == sent["MessageAttributes"]["amount"]["StringValue"].encode()
        else:
            assert event.get_extension("trace") is None


# -- 2. FIFO ------------------------------------------------------------------------------


def test_fifo_groups_stay_on_one_partition_in_order(
    sqs: Any, make_queue: Any, aws_env: dict[str, str], kafka_broker: str, tmp_path: Path
) -> None:
    groups, per_group = 20, 250
    queue = make_queue(fifo=True, visibility_timeout=30)
    topic = new_topic(kafka_broker, partitions=3)
    names = [f"group-{g:02d}" for g in range(groups)]
    # Four senders, each owning five groups and interleaving them: batches mix groups, and the
    # order within a group is the send order.
    chunks = [
        [{"MessageBody": f"{g}:{seq}", "MessageGroupId": g} for seq in range(per_group) for g in owned]
        for owned in (names[i::4] for i in range(4))
    ]
    send_parallel(sqs, queue.url, chunks, threads=4)

    poller = PollerProcess(poller_args(queue.url, kafka_broker, topic), aws_env, tmp_path / "poller.log")
    try:
        wait_until(lambda: remaining(sqs, queue.url) == 0, 180, "the FIFO queue to be empty")
    finally:
        code = poller.stop()
    assert code == 0, poller.log_text()[-3000:]

    total = groups * per_group
    records = consume_topic(kafka_broker, topic, lambda rs: len(rs) >= total)
    assert len(records) == total
    on_partitions: dict[str, set[int]] = {}
    order: dict[str, list[int]] = {}
    for record in sorted(records, key=lambda r: (r.partition(), r.offset())):
        event = ce_kafka.from_binary_event(
            ce_kafka.KafkaMessage(headers=dict(record.headers() or []), key=record.key(), value=record.value())
        )
        group, seq = event.get_data()["Body"].split(":")
        assert record.key() == group.encode(), f"key {record.key()!r} for a message of {group}"
        assert event.get_data()["Attributes"]["MessageGroupId"] == group
        on_partitions.setdefault(group, set()).add(record.partition())
        order.setdefault(group, []).append(int(seq))
    assert set(order) == set(names)
    for group in names:
        assert len(on_partitions[group]) == 1, f"{group} on partitions {on_partitions[group]}"
        assert order[group] == list(range(per_group)), f"{group} out of order: {order[group][:40]}..."
    assert len({p for ps in on_partitions.values() for p in ps}) > 1, "all groups on one partition"


# -- 3. broker outage -----------------------------------------------------------------------


def test_broker_down_10s_deletes_nothing_unacked(
    sqs: Any, make_queue: Any, aws_env: dict[str, str], tansu_factory: Any, tmp_path: Path
) -> None:
    # Durable storage: tansu's s3 engine on the session LocalStack's S3, so the records acked
    # before the stop are still there after the restart on the same port.
    storage, env = tansu_factory.s3_storage()
    broker = tansu_factory(storage=storage, env=env)
    bootstrap = broker.endpoint
    port = int(bootstrap.rsplit(":", 1)[1])
    topic = new_topic(bootstrap, partitions=3)

    n = 4000
    queue = make_queue(visibility_timeout=10)
    ids = [mid for chunk in send_parallel(sqs, queue.url, split([f"o{i}" for i in range(n)], 10)) for mid in chunk]
    # Records wait at most 4 s for the broker, then fail: the circuit opens and the messages are
    # kept and probed. (Those timeouts make librdkafka bump the producer epoch, and the restarted
    # tansu then fences that producer for good: the channel must fail and the worker restart with
    # a new producer, or the queue never empties.)
    poller = PollerProcess(
        poller_args(queue.url, bootstrap, topic, "--kafka-config", "message.timeout.ms=4000",
                    "--nack-backoff", "1", "--nack-backoff-max", "4"),
        aws_env, tmp_path / "poller.log",
    )
    try:
        wait_until(lambda: remaining(sqs, queue.url) <= n - 500, 120, "the flow to start", interval=0.1)
        # A crash, not a graceful stop: tansu keeps serving for ~5 s after SIGTERM, and a kill
        # also cuts off the requests in flight (the producer must retry them after the restart).
        os.killpg(broker.pid, signal.SIGKILL)
        broker.stop()  # reaps it
        stopped = time.monotonic()
        left_at_stop = remaining(sqs, queue.url)
        assert left_at_stop > 0, "the queue emptied before the broker was stopped: send more"
        time.sleep(1.5)  # deletes of what the broker acked before it stopped may still land
        left_early = remaining(sqs, queue.url)
        time.sleep(max(0.0, 10 - (time.monotonic() - stopped)))
        left_late = remaining(sqs, queue.url)
        assert left_late == left_early, f"{left_early - left_late} messages deleted while the broker was down"
        broker = tansu_factory(port=port, storage=storage, env=env)
        wait_until(lambda: remaining(sqs, queue.url) == 0, 150, "the queue to be empty after the restart")
    finally:
        code = poller.stop()
    text = poller.log_text()
    assert code == 0, text[-3000:]

    records = consume_topic(bootstrap, topic, has_ids(set(ids)), timeout=60)
    in_kafka = Counter(ce_id(r) for r in records)
    missing = set(ids) - set(in_kafka)
    assert not missing, f"{len(missing)} messages deleted from SQS without their record in Kafka"
    assert set(in_kafka) == set(ids)
    assert queue_counts(sqs, queue.url) == (0, 0)
    assert "circuit open" in text, "no delivery failed: the outage did not hit the flow"
    print(f"\nbroker outage: {left_at_stop} messages left at the stop, {len(records)} records for {n} "
          f"messages ({len(records) - n} duplicates, allowed); worker restarts: "
          f"{text.count('channel failed, restarting the worker')}")


# -- 4. start-up errors ---------------------------------------------------------------------

POLLER = str(Path(sys.executable).with_name("poller"))
_SCRUBBED_PREFIXES = ("POLLER_", "K_SINK", "K_CE_OVERRIDES", "AWS_", "KAFKA_")




@pytest.fixture(scope="module")
def silent_broker() -> Iterator[str]:
    """A hung broker: accepts connections and never answers a byte."""
    with silent_server() as address:
        yield address


# Bad --kafka-config syntax, unknown keys and bad values are in test_cli_errors.py; these are the
# cases it does not have: a broker that is missing, refusing or hung, a missing topic, and config
# that only librdkafka's producer (or the channel) rejects. The queue has a DLQ, as in production;
# "-no-dlq" runs the same on a queue without a redrive policy (the poller warns about that).
# (id, kafka args, extra env, texts the line must contain, seconds it may take, queue)
START_CASES = [
    ("missing-topic", ["--kafka-topic", "{missing}"], {}, ["does not exist", "{missing}"], 20, "dlq"),
    ("broker-refuses", ["--kafka-bootstrap-servers", "{refused}"], {}, ["cannot reach Kafka", "{refused}"], 25, "dlq"),
    ("broker-silent", ["--kafka-bootstrap-servers", "{silent}"], {}, ["cannot reach Kafka", "{silent}"], 25, "dlq"),
    ("config-conflict", ["--kafka-config", "acks=1"], {}, ["kafka-config", "acks"], 15, "dlq"),
    ("config-reserved", ["--kafka-config", "bootstrap.servers=127.0.0.1:1"], {}, ["bootstrap.servers"], 15, "dlq"),
    ("config-env", [], {"POLLER_KAFKA_CONFIG": "linger.ms=5\nno.such.key=1"}, ["no.such.key"], 15, "dlq"),
    ("missing-topic-no-dlq", ["--kafka-topic", "{missing}"], {}, ["does not exist", "{missing}"], 20, "plain"),
    ("broker-refuses-no-dlq", ["--kafka-bootstrap-servers", "{refused}"], {}, ["cannot reach Kafka"], 25, "plain"),
]
START_PARAMS = [
    pytest.param(case, id=case[0]) for case in START_CASES
]


@pytest.fixture(scope="module")
def start_results(sqs: Any, aws_env: dict[str, str], kafka_broker: str,
                  silent_broker: str) -> Iterator[dict[str, tuple[subprocess.CompletedProcess[str], float]]]:
    """Runs every case's ``poller run`` at once (the slow ones wait out the metadata timeout)."""
    stem = f"kafka-start-{uuid.uuid4().hex[:8]}"
    dlq_url = sqs.create_queue(QueueName=f"{stem}-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    redrive = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "5"})
    queues = {"dlq": sqs.create_queue(QueueName=stem, Attributes={"RedrivePolicy": redrive})["QueueUrl"],
              "plain": sqs.create_queue(QueueName=f"{stem}-plain")["QueueUrl"]}
    values = {"missing": f"no-such-topic-{uuid.uuid4().hex[:8]}", "refused": f"127.0.0.1:{free_port()}",
              "silent": silent_broker}
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_PREFIXES)}
    base_env.update(aws_env)

    def run_case(case: tuple[Any, ...]) -> tuple[subprocess.CompletedProcess[str], float]:
        _, args, extra, _, limit, queue = case
        kafka = {"--kafka-bootstrap-servers": kafka_broker, "--kafka-topic": new_topic(kafka_broker, 1)}
        rest: list[str] = []
        for i in range(0, len(args), 2):
            flag, value = args[i], args[i + 1].format(**values)
            if flag in kafka:
                kafka[flag] = value
            else:
                rest += [flag, value]
        argv = [POLLER, "run", "--queue-url", queues[queue], "--channel", "kafka", "--processes", "1",
                *(x for pair in kafka.items() for x in pair), *rest]
        started = time.monotonic()
        result = subprocess.run(argv, env={**base_env, **extra}, capture_output=True, text=True,
                                timeout=limit + 30, stdin=subprocess.DEVNULL)
        return result, time.monotonic() - started

    try:
        with ThreadPoolExecutor(len(START_CASES)) as pool:
            results = list(pool.map(run_case, START_CASES))
        yield {case[0]: (result, values) for case, result in zip(START_CASES, results)}  # type: ignore[misc]
    finally:
        for url in (*queues.values(), dlq_url):
            sqs.delete_queue(QueueUrl=url)


# One worker runs the start-up cases: start_results runs them all at once, once per module.
@pytest.mark.xdist_group("kafka-start-errors")
@pytest.mark.parametrize("case", START_PARAMS)
def test_start_error_is_one_line_and_non_zero_in_bounded_time(case: tuple[Any, ...], start_results: Any) -> None:
    name, _, _, expected, limit, _ = case
    (result, elapsed), values = start_results[name]
    stderr = result.stderr
    assert result.returncode != 0, f"exit 0; stderr={stderr!r}"
    assert "Traceback" not in stderr + result.stdout, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected exactly one line on stderr, got {len(lines)}: {stderr!r}"
    assert lines[0].startswith("poller: error:"), lines[0]
    for text in expected:
        text = text.format(**values)
        assert text.lower() in lines[0].lower(), f"{text!r} not in {lines[0]!r}"
    assert elapsed < limit, f"took {elapsed:.1f} s (limit {limit} s)"


@pytest.mark.xdist_group("kafka-start-errors")
def test_missing_topic_was_not_created(start_results: Any, kafka_broker: str) -> None:
    _, values = start_results["missing-topic"]
    admin = AdminClient({"bootstrap.servers": kafka_broker, "logger": log})
    assert values["missing"] not in admin.list_topics(timeout=10).topics


# -- 5. oversize records --------------------------------------------------------------------


def test_oversize_records_go_to_the_dlq_and_the_rest_flow(
    sqs: Any, make_queue: Any, aws_env: dict[str, str], kafka_broker: str, tmp_path: Path
) -> None:
    queue = make_queue(visibility_timeout=2, dlq_max_receive_count=2)
    topic = new_topic(kafka_broker, partitions=3)
    bodies = [f"small {i}" for i in range(50)] + [f"big {i} " + "x" * 10_000 for i in range(5)]
    random.Random(55).shuffle(bodies)
    ids = send_messages(sqs, queue.url, bodies)
    small = {mid for mid, body in zip(ids, bodies) if body.startswith("small")}
    big = {body for body in bodies if body.startswith("big")}

    poller = PollerProcess(
        poller_args(queue.url, kafka_broker, topic, "--kafka-config", "message.max.bytes=2000"),
        aws_env, tmp_path / "poller.log",
    )
    try:
        dead: list[dict[str, Any]] = []

        def dlq_has_all_big() -> bool:
            dead.extend(drain(sqs, queue.dlq_url, idle_receives=1, wait_seconds=1))
            return len(dead) >= len(big)

        wait_until(dlq_has_all_big, 90, "the oversize messages in the DLQ")
        wait_empty(sqs, queue.url, 30)
    finally:
        code = poller.stop()
    text = poller.log_text()
    assert code == 0, text[-3000:]

    assert sorted(m["Body"] for m in dead) == sorted(big)
    records = consume_topic(kafka_broker, topic, lambda rs: len(rs) >= len(small))
    assert Counter(ce_id(r) for r in records) == Counter(small)
    assert "rejected message" in text and "too large" in text.lower()
