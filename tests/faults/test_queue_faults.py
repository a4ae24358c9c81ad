"""Fault suite: what the poller gives back to the queue. Messages that arrive while the poller
stops must not be left invisible; a FIFO queue's groups must keep their order while messages are
refused, returned and held by a worker that is killed.

Real LocalStack SQS -> the real ``poller run`` -> the dumper. Each case counts what the sink
really accepted and what is back on the queue.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from faultproxy import Delay, FaultProxy
from support import (
    Deliveries, FaultCase, PollerProcess, SinkDeliveries, Tally, drain, dumper_sink, free_port, metric_samples,
    metrics_by_key, queue_counts, send_messages, tally, wait_empty, wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults]


def quick_tally(sqs: Any, ids: Sequence[str], deliveries: Deliveries, url: str, wait: float, *,
                receives: Counter[int] | None = None, dlq_url: str | None = None) -> Tally:
    """``tally`` for a case whose flow has ended: what the queue (and ``dlq_url``) holds is
    drained (receive and delete, until a 1 s receive comes back empty twice), the rest is what
    the sink received. Shorter than ``tally(drain_url=...)``, which waits for broken-off
    receives to come back. ``receives``: filled with how many times SQS had handed out each
    message drained from the queue before the drain. The queue first: a message the drain's
    receive takes past the redrive policy's maxReceiveCount is moved to the DLQ by SQS instead."""
    drained = drain(sqs, url, idle_receives=2, wait_seconds=1)
    dead = Counter(m["MessageId"] for m in drain(sqs, dlq_url, idle_receives=1)) if dlq_url else Counter()
    if receives is not None:  # the drain's own receive is the last one
        receives.update(int(m["Attributes"]["ApproximateReceiveCount"]) - 1 for m in drained)
    queued = Counter(m["MessageId"] for m in drained)
    expected = set(ids) - queued.keys() - dead.keys()
    return Tally(frozenset(ids), deliveries.ids(expected, timeout=wait), dead, queued)


def exit_code(poller: PollerProcess, timeout: float) -> int:
    """Wait for a poller that is stopping already (``stop()`` would signal it a second time: a
    second SIGTERM kills the workers at once)."""
    poller.proc.wait(timeout)
    return poller.stop()


# -- 6. a stop does not leave the messages of its last long polls invisible -------------------------


def brought_after_stop(log_text: str) -> int:
    """Messages the workers say long polls brought after the stop (and gave back, visible again
    once every poll in flight has ended)."""
    return sum(int(line.split("returned ")[1].split()[0]) for line in log_text.splitlines()
               if "a long poll brought after the stop" in line)


def sigterm_while_messages_arrive(sqs: Any, url: str, poller: PollerProcess, n: int) -> tuple[list[str], str]:
    """The poller waits on an empty queue, every receiver in a long poll; SIGTERM, and right after
    it ``n`` messages arrive. Waits for the poller to exit 0; returns the ids and a note."""
    poller.wait_for_workers(2)
    time.sleep(1.0)  # every receiver is in a long poll
    poller.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    ids = send_messages(sqs, url, [f"at-sigterm-{i}" for i in range(n)])
    sent_after = time.monotonic() - signalled
    assert exit_code(poller, 30) == 0, poller.log_text()[-3000:]
    return ids, (f"sent {sent_after:.2f} s after SIGTERM; exited after {time.monotonic() - signalled:.1f} s; "
                 f"{brought_after_stop(poller.log_text())} brought by long polls after the stop")


def test_sigterm_during_long_polls_orphans_no_message(
    sqs: Any, make_queue: Any, start_poller: Callable[..., PollerProcess], fault_case: Callable[..., FaultCase],
) -> None:
    """The poller waits on an empty queue with --wait-time 5 (eight long polls in flight); SIGTERM,
    and right after it 10 messages arrive, which SQS hands to those polls. The queue's visibility
    timeout is 60 s: a poll broken off, or one whose messages were kept, would leave them
    invisible for a minute. Its DLQ takes a message at its fourth receive (maxReceiveCount 3). The
    poller lets the polls finish and gives what they bring back, visible again once every poll in
    flight has ended: within the 5 s wait of the exit 0, all 10 are visible, each handed out once
    during the stop, and the next receive (the count's drain, as a new poller's would) finds all
    10 on the queue, none moved to the DLQ. Duplicates: 0 (nothing was delivered).

    Failed at e0cf4cb: each message a poll brought after the stop was given back at once
    (visibility 0), so another poll still in flight took it, gave it back, and so on: the 10
    messages were handed out 3-4 times each during one stop (30-40 returns, 8 polls in flight),
    and the next receive moved those handed out 3 times to the DLQ. Now they are visible again
    once every poll in flight has ended."""
    case = fault_case("SIGTERM during long polls, messages arriving (DLQ at maxReceiveCount 3)", "http",
                      max_duplicates=0)
    queue = make_queue(visibility_timeout=60, dlq_max_receive_count=3)
    with dumper_sink() as server:
        deliveries = SinkDeliveries(server)
        ids: list[str] = []
        receives: Counter[int] = Counter()
        case.count_with(lambda wait: quick_tally(sqs, ids, deliveries, queue.url, wait, receives=receives,
                                                 dlq_url=queue.dlq_url))
        poller = start_poller(queue.url, deliveries.poller_args(), "--wait-time", "5")
        sent, note = sigterm_while_messages_arrive(sqs, queue.url, poller, 10)
        ids += sent
        wait_until(lambda: queue_counts(sqs, queue.url) == (10, 0), 5 + 2, "all 10 visible again",
                   interval=0.1)
        counts = queue_counts(sqs, queue.url)
    case.note(f"{note}; queue (visible, invisible) {counts}")
    assert brought_after_stop(poller.log_text()), "no long poll brought a message after the stop: no fault"
    result = case.finish()
    case.note("times handed out before the drain: " + ", ".join(f"{n}: {k}" for n, k in sorted(receives.items())))
    assert not result.dead, (f"{len(result.dead)} of 10 healthy messages in the DLQ after one SIGTERM; "
                             f"times the queue's messages were handed out: {dict(receives)}")
    assert len(result.queued) == 10 and not result.delivered, result
    assert set(receives) == {1}, f"handed from poll to poll during the stop: {dict(receives)}"


def test_sigterm_with_the_window_open_loses_nothing(
    sqs: Any, sqs_endpoint: str, make_queue: Any, start_poller: Callable[..., PollerProcess],
    fault_case: Callable[..., FaultCase],
) -> None:
    """SQS 20 ms away (the fault proxy delays every answer), a backlog of 5,000, one worker: its
    receive window (poller/window.py) runs more long polls than --receivers' 8. SIGTERM mid-flow:
    the receivers beyond --receivers stop with the others, what their polls bring is given back,
    exit 0, and every message is delivered or back on the queue. Duplicates <= 10 (one delete
    batch), as for a SIGTERM under load. The SIGTERM waits for the window to be open (its gauge);
    how many polls are in flight at that instant depends on the room under --max-in-flight."""
    case = fault_case("SIGTERM with the receive window open (SQS +20 ms)", "http", max_duplicates=10)
    n = 5000
    port = free_port()

    def allowed() -> float:
        """The window's gauge (0 while /metrics is not serving yet)."""
        return metrics_by_key(metric_samples(port)).get("sqs_poller_receivers", 0.0)

    queue = make_queue(visibility_timeout=30)
    with dumper_sink() as server, FaultProxy(sqs_endpoint) as proxy:
        proxy.set(Delay(0.02))
        deliveries = SinkDeliveries(server)
        ids = send_messages(sqs, queue.url, [f"window-{i}" for i in range(n)])
        case.count_with(lambda wait: tally(sqs, ids, deliveries, wait=wait, drain_url=queue.url))
        poller = start_poller(queue.url, deliveries.poller_args(), "--endpoint-url", proxy.url,
                              "--processes", "1", "--wait-time", "5", "--metrics-port", str(port),
                              "--metrics-host", "127.0.0.1")
        wait_until(lambda: len(server.received) >= 500, 60, "the flow to start")
        wait_until(lambda: allowed() > 8, 30, "the receive window to open beyond --receivers' 8")
        window = allowed()
        assert poller.stop(timeout=40) == 0, poller.log_text()[-3000:]
        polls = [int(line.split(" message(s) held, ")[1].split()[0]) for line in poller.log_text().splitlines()
                 if "stopping:" in line and "long poll(s) in flight" in line]
    result = case.finish()
    case.note(f"window at the stop: {window:g} long polls allowed, {polls} in flight; "
              f"{len(result.queued)} back on the queue after")
    assert polls, "no stop line with the long polls in flight"
    assert result.queued, "nothing was left on the queue: the SIGTERM did not hit a flow"


def test_until_empty_stop_orphans_no_message(
    sqs: Any, make_queue: Any, start_poller: Callable[..., PollerProcess], fault_case: Callable[..., FaultCase],
) -> None:
    """``poller run --until-empty`` drains 20 messages; as soon as it says the queue is empty and
    stops, 10 more arrive while its last long polls (1 s once the queue looked empty) are in
    flight. The queue's visibility timeout is 60 s. Within those polls' 1 s (and 1 s of slack) of
    its exit 0, every message is either delivered or visible again: none is left invisible.
    Duplicates: 0."""
    case = fault_case("--until-empty stop, messages arriving", "http", max_duplicates=0)
    queue = make_queue(visibility_timeout=60)
    with dumper_sink() as server:
        deliveries = SinkDeliveries(server)
        ids = send_messages(sqs, queue.url, [f"before-stop-{i}" for i in range(20)])
        case.count_with(lambda wait: quick_tally(sqs, ids, deliveries, queue.url, wait))
        poller = start_poller(queue.url, deliveries.poller_args(), "--until-empty")
        wait_until(lambda: "the queue is empty" in poller.log_text(), 60, "the poller to find the queue empty",
                   interval=0.01)
        ids += send_messages(sqs, queue.url, [f"at-stop-{i}" for i in range(10)])
        assert exit_code(poller, 30) == 0, poller.log_text()[-3000:]
        delivered = len(server.events)
        wait_until(lambda: queue_counts(sqs, queue.url)[0] + delivered >= len(ids), 1 + 2,
                   "every message delivered or visible again", interval=0.1)
        visible, invisible = queue_counts(sqs, queue.url)
    text = poller.log_text()
    brought = brought_after_stop(text)
    case.note(f"after the exit: {delivered} delivered, {visible} visible, {invisible} invisible; "
              f"{brought} brought by long polls after the stop")
    assert invisible == 0, f"{invisible} messages left invisible\n{text[-3000:]}"
    assert visible + delivered == len(ids), (visible, delivered, len(ids))
    case.finish()


# -- 7. FIFO order while messages are refused, returned, and held by a killed worker ----------------

GROUPS = 6
PER_GROUP = 20
# A message returned after its first receive is invisible 2 or 3 s (2.5 s +/- the backoff's 20%
# jitter, rounded), after its second 4 or 5 s: the messages of one run would get different
# visibilities if each had its own. Capped at 5 s so the case stays short.
NACKS = ("--nack-backoff", "2.5", "--nack-backoff-max", "5")


def test_fifo_order_when_messages_are_given_back(
    sqs: Any, make_queue: Any, start_poller: Callable[..., PollerProcess], fault_case: Callable[..., FaultCase],
) -> None:
    """A FIFO queue, 6 groups x 30 messages; the sink answers 503 to 20% of the events (seeded),
    --retries 1, so some runs are returned to SQS; one worker is SIGKILLed mid-flow (what it held
    comes back after the 3 s visibility timeout). For each group, the order in which the sink
    first accepted its messages is the send order: a message accepted before an earlier one of
    its group would break it. Duplicates <= 30 (--max-in-flight): only the killed worker's
    messages, accepted by the sink and not yet deleted, are delivered twice."""
    max_in_flight = 30
    case = fault_case("FIFO order: 503 to 20%, returns, worker SIGKILL", "http", max_duplicates=max_in_flight)
    queue = make_queue(fifo=True, visibility_timeout=3)
    rng, lock = random.Random(7), threading.Lock()

    def flaky(event: dict[str, Any], headers: Any) -> int | None:
        with lock:
            return 503 if rng.random() < 0.2 else None

    with dumper_sink(respond=flaky) as server:
        deliveries = SinkDeliveries(server)
        sent = {f"g{g}": send_messages(sqs, queue.url, [f"g{g}-{i}" for i in range(PER_GROUP)], group_id=f"g{g}")
                for g in range(GROUPS)}
        ids = [mid for group in sent.values() for mid in group]
        case.count_with(lambda wait: tally(sqs, ids, deliveries, wait=wait))
        poller = start_poller(queue.url, deliveries.poller_args(), "--retries", "1", "--max-in-flight",
                              str(max_in_flight), *NACKS)
        poller.wait_for_workers(2)
        wait_until(lambda: len(server.events) >= 40, 60, "40 events accepted", interval=0.02)
        victim = poller.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        wait_empty(sqs, queue.url, 120)
        assert poller.stop() == 0, poller.log_text()[-3000:]
        accepted = [e["id"] for e in server.events]
    first: dict[str, int] = {}
    for position, mid in enumerate(accepted):
        first.setdefault(mid, position)
    # Per group: the most messages first accepted ahead of an earlier message of their group.
    ahead = {group: max(sum(1 for later in group_ids[k + 1:] if first.get(later, -1) < first.get(mid, -1)
                            and later in first) for k, mid in enumerate(group_ids))
             for group, group_ids in sent.items()}
    case.note(f"sink refused {server.counts.refused} events; most accepted ahead of an earlier one, "
              f"per group: {ahead}")
    assert server.counts.refused >= 10, "the sink hardly refused anything: the fault did not hit"
    assert "was killed by SIGKILL" in poller.log_text()
    result = case.finish()
    for group, group_ids in sent.items():
        order = sorted(group_ids, key=first.__getitem__)
        assert order == group_ids, (
            f"group {group}: first accepted in the order "
            f"{[group_ids.index(mid) for mid in order]}, sent 0..{PER_GROUP - 1}")
    assert result.duplicates <= max_in_flight
