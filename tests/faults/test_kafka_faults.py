"""Fault suite: the Kafka producer itself in trouble. Its local queue full while the broker is down
(the worker's loop must keep turning), and a broker that comes back without its state (in-memory
tansu restarted: it knows neither the topic nor the producer's id), which leaves an idempotent
producer failing every record while the broker answers.

Counted from the topic as the other Kafka cases are: every partition read from offset 0.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from faultproxy import Fault, FaultProxy
from support import (
    FaultCase, PollerProcess, Tally, TopicDeliveries, free_port, new_topic, queue_counts, send_messages, tally, wait_empty,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults]

log = logging.getLogger(__name__)

QUICK_NACKS = ("--nack-backoff", "1", "--nack-backoff-max", "8")
KILLED = "sent no heartbeat"  # the supervisor's line when it kills a worker (poller/supervisor.py)



def wait_taken(sqs: Any, url: str, timeout: float = 20) -> None:
    """The poller holds messages (received, not deleted)."""
    wait_until(lambda: queue_counts(sqs, url)[1] > 0, timeout, "the poller to take messages")


def create_topic_again(bootstrap: str, topic: str, partitions: int = 3) -> None:
    """The topic on a broker that forgot it. The producer's own metadata request may have made
    tansu create it first (auto-create): then it is there already, which is as good."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "logger": log})
    try:
        admin.create_topics([NewTopic(topic, partitions, 1)], request_timeout=15)[topic].result(timeout=20)
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise
        log.info("topic %s was created again by the producer's metadata request", topic)


@pytest.fixture
def kafka_behind_proxy(tansu_factory: Any) -> Any:
    """A tansu of the test's own reached only through a fault proxy it advertises; a new topic."""
    port = free_port()
    with FaultProxy(f"127.0.0.1:{port}") as proxy:
        tansu_factory(port=port, advertised=proxy.address)
        yield TopicDeliveries(proxy.address, new_topic(proxy.address, partitions=3)), proxy


def test_small_local_queue_while_the_broker_is_down(
    sqs: Any, make_queue: Any, kafka_behind_proxy: tuple[TopicDeliveries, FaultProxy],
    start_poller: Callable[..., PollerProcess], fault_case: Callable[..., FaultCase],
) -> None:
    """librdkafka's local queue holds 5 records and the broker is unreachable for 10 s: the worker
    holds up to --max-in-flight messages, far more than fit. Waiting for room must not stop the
    worker's loop (heartbeats, visibility extensions): with --worker-timeout 6 a loop blocked
    through the outage gets the worker killed. Nothing is lost; duplicates: 0 (nothing reached
    the broker during the outage, the messages before it were settled when it began)."""
    deliveries, proxy = kafka_behind_proxy
    case = fault_case("local queue of 5 + broker down 10 s", "kafka", max_duplicates=0)
    queue = make_queue(visibility_timeout=10)
    poller = start_poller(queue.url, deliveries.poller_args(), "--worker-timeout", "6",
                          "--kafka-config", "queue.buffering.max.messages=5", *QUICK_NACKS)
    ids = send_messages(sqs, queue.url, [f"before-{i}" for i in range(100)])
    wait_empty(sqs, queue.url, 60)  # through a queue of 5, the broker up

    def count(wait: float) -> Tally:
        proxy.clear()  # a case that failed mid-outage is counted too
        return tally(sqs, ids, deliveries, wait=wait)

    case.count_with(count)
    proxy.set(Fault.REFUSE)
    outage_ends = time.monotonic() + 10
    ids += send_messages(sqs, queue.url, [f"during-{i}" for i in range(300)])
    wait_taken(sqs, queue.url)
    time.sleep(max(0.0, outage_ends - time.monotonic()))
    assert poller.proc.poll() is None, f"the poller exited during the outage:\n{poller.log_text()[-3000:]}"
    proxy.clear()
    wait_empty(sqs, queue.url, 90)
    text = poller.log_text()
    assert KILLED not in text, "a worker was killed for want of a heartbeat:\n" + "\n".join(
        line for line in text.splitlines() if KILLED in line)
    assert poller.stop() == 0, poller.log_text()[-3000:]
    case.finish()


def test_broker_restarted_without_its_state(
    sqs: Any, make_queue: Any, tansu_factory: Any, start_poller: Callable[..., PollerProcess],
    fault_case: Callable[..., FaultCase],
) -> None:
    """The broker (tansu, memory storage) is stopped and started again on the same port while the
    poller runs: it has forgotten the topic (created again) and the producers' ids. The idempotent
    producer each worker had made no progress from then on (every produce answered
    UNKNOWN_PRODUCER_ID, every record timed out) while the broker answered metadata; it must be
    replaced, and every message sent after the restart must end in the topic. The messages
    delivered before it are gone with the broker's memory and not counted. Duplicates: 0 (the
    broker stored none of the records it refused)."""
    port = free_port()
    broker = tansu_factory(port=port)
    deliveries = TopicDeliveries(broker.endpoint, new_topic(broker.endpoint, partitions=3))
    case = fault_case("broker restarted without its state", "kafka", max_duplicates=0)
    queue = make_queue(visibility_timeout=10)
    # A record waits for the broker 2 s: an attempt fails (and the stuck producer shows) sooner.
    poller = start_poller(queue.url, deliveries.poller_args(), "--kafka-config", "message.timeout.ms=2000",
                          *QUICK_NACKS)
    send_messages(sqs, queue.url, [f"before-{i}" for i in range(100)])
    wait_empty(sqs, queue.url, 60)  # each worker's producer has its id and sequence numbers
    broker.stop()
    ids = send_messages(sqs, queue.url, [f"after-{i}" for i in range(300)])
    case.count_with(lambda wait: tally(sqs, ids, deliveries, wait=wait))
    wait_taken(sqs, queue.url)
    broker = tansu_factory(port=port)  # memory storage: no topic, no producer ids
    create_topic_again(broker.endpoint, deliveries.topic)
    wait_empty(sqs, queue.url, 90)
    assert poller.stop() == 0, poller.log_text()[-3000:]
    case.finish()
