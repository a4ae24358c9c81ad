"""Fault suite: the channel misbehaves. A sink that refuses connections, fails a fifth of the
requests, is slower than the visibility timeout or trickles its answers; a broker that is down
while a worker is replaced; either one down for longer than the DLQ's receive budget.

Network faults go through tests/faultproxy.py: in front of the dumper (the poller's ``--sink`` is
the proxy), or in front of tansu (which advertises the proxy's address, so the Kafka client's
reconnects go through it too). Outages are held for a fixed time (that is the fault); outcomes are
waited for on conditions, then counted from what the sink or the topic really received.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from faultproxy import Fault, FaultProxy, Trickle
from support import (
    Deliveries, FaultCase, PollerProcess, SinkDeliveries, Tally, TopicDeliveries, dumper_sink, free_port, new_topic,
    queue_counts, send_messages, tally, wait_empty, wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults]

# Short nack backoffs, so the messages refused during an outage come back soon after it ends.
QUICK_NACKS = ("--nack-backoff", "1", "--nack-backoff-max", "8")


def remaining(sqs: Any, url: str) -> int:
    return sum(queue_counts(sqs, url))



def hold_until(deadline: float) -> None:
    """The rest of an outage: the fault lasts this long whatever the poller does."""
    time.sleep(max(0.0, deadline - time.monotonic()))


@contextmanager
def topic_behind_proxy(tansu_factory: Any) -> Iterator[tuple[TopicDeliveries, FaultProxy]]:
    """A tansu broker of the test's own, reached only through a fault proxy it advertises, and a
    new topic on it."""
    port = free_port()
    with FaultProxy(f"127.0.0.1:{port}") as proxy:
        tansu_factory(port=port, advertised=proxy.address)
        yield TopicDeliveries(proxy.address, new_topic(proxy.address, partitions=3)), proxy


# Fixtures rather than ``with`` blocks in the tests: the channel outlives the test body, so a
# failed case can still be counted (through a cleared proxy) for the report.
@pytest.fixture
def kafka_behind_proxy(tansu_factory: Any) -> Iterator[tuple[TopicDeliveries, FaultProxy]]:
    with topic_behind_proxy(tansu_factory) as pair:
        yield pair


@pytest.fixture(params=["http", "kafka"])
def proxied(request: pytest.FixtureRequest, tansu_factory: Any) -> Iterator[tuple[Deliveries, FaultProxy]]:
    """Each channel behind a fault proxy: a dumper sink, or a tansu broker and a new topic."""
    if request.param == "http":
        with dumper_sink() as server, FaultProxy(server.url) as proxy:
            yield SinkDeliveries(server, proxy.url), proxy
    else:
        with topic_behind_proxy(tansu_factory) as pair:
            yield pair


def counted_through(proxy: FaultProxy, count: Callable[[float], Tally]) -> Callable[[float], Tally]:
    """``count``, after clearing the proxy's fault (a case that failed mid-outage is counted too)."""

    def clear_and_count(wait: float) -> Tally:
        proxy.clear()
        return count(wait)

    return clear_and_count


def warm_up(sqs: Any, url: str, count: int = 100) -> list[str]:
    """Messages delivered before the fault: the path through the proxy works, nothing is in flight."""
    ids = send_messages(sqs, url, [f"before-{i}" for i in range(count)])
    wait_empty(sqs, url, 60)
    return ids


# -- HTTP sink ------------------------------------------------------------------------------------


def test_sink_refusing_connections_for_30s(
    sqs: Any, make_queue: Any, start_poller: Callable[..., PollerProcess], fault_case: Callable[..., FaultCase],
) -> None:
    """The sink refuses connections for 10 s (open ones are reset), then is healthy: nothing is
    deleted during the outage and everything arrives after. Duplicates: 0 (the messages before
    the outage were settled when it began, and a refused connection delivers nothing)."""
    case = fault_case("sink refusing connections 10 s", "http", max_duplicates=0)
    queue = make_queue(visibility_timeout=30)
    with dumper_sink() as server, FaultProxy(server.url) as proxy:
        deliveries = SinkDeliveries(server, proxy.url)
        poller = start_poller(queue.url, deliveries.poller_args(), *QUICK_NACKS)
        ids = warm_up(sqs, queue.url)
        case.count_with(lambda wait: tally(sqs, ids, deliveries, wait=wait))
        proxy.set(Fault.REFUSE)
        outage_ends = time.monotonic() + 10
        during = send_messages(sqs, queue.url, [f"during-{i}" for i in range(300)])
        ids += during
        hold_until(outage_ends)
        assert remaining(sqs, queue.url) == len(during), "messages were deleted while the sink was down"
        proxy.clear()
        wait_empty(sqs, queue.url, 150)
        assert poller.stop() == 0, poller.log_text()[-3000:]
    case.finish()


def test_sink_answering_500_or_429_to_a_fifth(
    sqs: Any, make_queue: Any, start_poller: Callable[..., PollerProcess], fault_case: Callable[..., FaultCase],
) -> None:
    """The sink answers 500 or 429 to a random 20% of the requests (seeded): every message
    arrives. Duplicates: 0 (the dumper keeps only the events it answered 2xx)."""
    case = fault_case("sink answering 500/429 to 20%", "http", max_duplicates=0)
    queue = make_queue(visibility_timeout=30)
    rng, lock = random.Random(20), threading.Lock()

    def flaky(event: dict[str, Any], headers: Any) -> int | None:
        with lock:
            roll = rng.random()
        return 500 if roll < 0.1 else 429 if roll < 0.2 else None

    with dumper_sink(respond=flaky) as server:
        deliveries = SinkDeliveries(server)
        ids = send_messages(sqs, queue.url, [f"flaky-{i}" for i in range(500)])
        case.count_with(lambda wait: tally(sqs, ids, deliveries, wait=wait))
        poller = start_poller(queue.url, deliveries.poller_args())
        wait_empty(sqs, queue.url, 120)
        assert poller.stop() == 0, poller.log_text()[-3000:]
    case.note(f"sink refused {server.counts.refused} requests")
    assert server.counts.refused >= 50, "the sink hardly failed: the fault did not hit"
    case.finish()


def test_sink_slower_than_the_visibility_timeout(
    sqs: Any, make_queue: Any, start_poller: Callable[..., PollerProcess], fault_case: Callable[..., FaultCase],
) -> None:
    """Visibility timeout 5 s; for the first 16 s of the flow the sink takes 8 s per event, then it
    is fast: the poller keeps what it holds invisible, so nothing is received twice. Duplicates: 0."""
    case = fault_case("sink slower than the visibility timeout", "http", max_duplicates=0)
    queue = make_queue(visibility_timeout=5)
    slow_until: list[float] = []
    lock = threading.Lock()

    def slow_at_first(event: dict[str, Any], headers: Any) -> None:
        with lock:
            if not slow_until:
                slow_until.append(time.monotonic() + 16)
            slow = time.monotonic() < slow_until[0]
        if slow:
            time.sleep(8)

    with dumper_sink(respond=slow_at_first) as server:
        deliveries = SinkDeliveries(server)
        ids = send_messages(sqs, queue.url, [f"slow-{i}" for i in range(200)])
        case.count_with(lambda wait: tally(sqs, ids, deliveries, wait=wait))
        poller = start_poller(queue.url, deliveries.poller_args())
        wait_empty(sqs, queue.url, 120)
        assert poller.stop() == 0, poller.log_text()[-3000:]
    case.finish()


def test_trickling_sink(
    sqs: Any, make_queue: Any, start_poller: Callable[..., PollerProcess], fault_case: Callable[..., FaultCase],
) -> None:
    """For 15 s the sink's answers trickle (1 byte every 0.2 s: an answer takes ~20 s, yet bytes
    keep coming; a connection that trickled keeps trickling), then new connections are healthy.
    With --http-timeout 2 bounding the whole request, the poller gives up on those requests and
    everything arrives. Every request given up was recorded by the sink: a duplicate. After the
    first failures the circuit opens: requests still queued behind the connection limit are held
    back, not sent, and only one probe per process goes out at a time (1 s apart at least). So
    duplicates <= what was on the wire (2 processes x 64 requests, the default
    --http-concurrency) + probes (2 x 15)."""
    case = fault_case("trickling sink 15 s", "http", max_duplicates=2 * 64 + 2 * 15)
    queue = make_queue(visibility_timeout=30)
    with dumper_sink() as server, FaultProxy(server.url) as proxy:
        deliveries = SinkDeliveries(server, proxy.url)
        poller = start_poller(queue.url, deliveries.poller_args(), "--http-timeout", "2", *QUICK_NACKS)
        ids = warm_up(sqs, queue.url)
        case.count_with(lambda wait: tally(sqs, ids, deliveries, wait=wait))
        proxy.set(Trickle(chunk=1, pause=0.2))
        trickle_ends = time.monotonic() + 15
        ids += send_messages(sqs, queue.url, [f"during-{i}" for i in range(200)])
        hold_until(trickle_ends)
        proxy.clear()
        case.note(f"{proxy.stats().trickled} connections trickled")
        assert proxy.stats().trickled > 0, "no answer trickled: the fault did not hit"
        wait_empty(sqs, queue.url, 120)
        assert poller.stop() == 0, poller.log_text()[-3000:]
    case.finish()


# -- Kafka broker ---------------------------------------------------------------------------------


def test_broker_down_20s_while_a_worker_is_replaced(
    sqs: Any, make_queue: Any, kafka_behind_proxy: tuple[TopicDeliveries, FaultProxy],
    start_poller: Callable[..., PollerProcess], fault_case: Callable[..., FaultCase],
) -> None:
    """The broker is unreachable for 20 s (connects refused, open connections reset) and a worker
    is SIGKILLed during the outage: its replacement starts while the broker is down (and fails to
    start once: the broker check takes 10 s). The poller
    keeps running (it does not exit) and delivers everything after. Duplicates: 0 (nothing reached
    the broker during the outage, and the messages before it were settled when it began)."""
    deliveries, proxy = kafka_behind_proxy
    case = fault_case("broker down 20 s + worker SIGKILL", "kafka", max_duplicates=0)
    queue = make_queue(visibility_timeout=10)
    poller = start_poller(queue.url, deliveries.poller_args())
    ids = warm_up(sqs, queue.url)
    case.count_with(counted_through(proxy, lambda wait: tally(sqs, ids, deliveries, wait=wait)))
    proxy.set(Fault.REFUSE)
    outage_ends = time.monotonic() + 20
    during = send_messages(sqs, queue.url, [f"during-{i}" for i in range(300)])
    ids += during
    wait_until(lambda: queue_counts(sqs, queue.url)[1] > 0, 20, "the poller to take messages during the outage")
    victim = poller.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    hold_until(outage_ends)
    assert poller.proc.poll() is None, f"the poller exited during the outage:\n{poller.log_text()[-3000:]}"
    assert remaining(sqs, queue.url) == len(during), "messages were deleted while the broker was down"
    proxy.clear()
    wait_empty(sqs, queue.url, 150)
    assert victim not in poller.worker_pids()
    assert poller.stop() == 0, poller.log_text()[-3000:]
    case.finish()


# -- either channel ---------------------------------------------------------------------------------


def test_channel_down_longer_than_the_dlq_budget(
    sqs: Any, make_queue: Any, proxied: tuple[Deliveries, FaultProxy], start_poller: Callable[..., PollerProcess],
    fault_case: Callable[..., FaultCase],
) -> None:
    """The sink or broker is unreachable for 25 s; the queue's DLQ takes a message after 4
    receives, and with nack backoffs of 1-4 s those 4 receives would take ~10 s. An outage must
    not burn the receive count of healthy messages: nothing reaches the DLQ, everything arrives
    afterwards. Few messages arrive during the outage (20), so a poller that returns them after
    each failed attempt cycles each one through its receives well within it. Duplicates: 0
    (nothing was delivered during the outage, the messages before it were settled when it began)."""
    deliveries, proxy = proxied
    case = fault_case("channel down 25 s > DLQ budget (maxReceiveCount 4)", deliveries.channel, max_duplicates=0)
    queue = make_queue(visibility_timeout=10, dlq_max_receive_count=4)
    extra = ["--nack-backoff", "1", "--nack-backoff-max", "4"]
    if deliveries.channel == "kafka":  # the producer gives a record up after 5 s, as a sink times out
        extra += ["--kafka-config", "message.timeout.ms=5000"]
    poller = start_poller(queue.url, deliveries.poller_args(), *extra)
    ids = warm_up(sqs, queue.url)
    case.count_with(counted_through(
        proxy, lambda wait: tally(sqs, ids, deliveries, wait=wait, dlq_url=queue.dlq_url)))
    proxy.set(Fault.REFUSE)
    outage_ends = time.monotonic() + 25
    ids += send_messages(sqs, queue.url, [f"during-{i}" for i in range(20)])
    hold_until(outage_ends)
    proxy.clear()
    wait_empty(sqs, queue.url, 150)
    assert poller.stop() == 0, poller.log_text()[-3000:]
    result = case.finish()
    assert not result.dead, f"{len(result.dead)} healthy messages went to the DLQ during the outage"
