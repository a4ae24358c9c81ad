"""poller/worker.Worker without SQS: outcomes, in-place retries, the circuit, the in-flight bound.

A fake channel takes the runs; the delete batcher and the visibility lanes are replaced by
recorders. No thread of the worker is started (``run`` is not called), so nothing talks to SQS;
the retrier's decisions are driven by calling ``_take_due`` with a chosen clock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest

from channels.base import Channel, Message, Outcome, Report
from poller.config import WorkerConfig
from poller.ledger import Stage
from poller.sqs import SqsTarget
from poller.worker import Worker

TARGET = SqsTarget(queue_url="http://127.0.0.1:9/000000000000/q", region="us-east-1",
                   endpoint_url="http://127.0.0.1:9")


class FakeChannel(Channel):
    def __init__(self) -> None:
        self.published: list[tuple[list[Message], Report]] = []

    def publish(self, batch: Sequence[Message], report: Report) -> None:
        self.published.append((list(batch), report))

    def report_last(self, outcome: Outcome, reason: str = "") -> None:
        """Report every message of the last publish."""
        batch, report = self.published[-1]
        for message in batch:
            report(message, outcome, reason)

    def report_all(self, outcome: Outcome, reason: str = "") -> None:
        for batch, report in self.published:
            for message in batch:
                report(message, outcome, reason)


@dataclass(frozen=True)
class FakeChannelConfig:
    name: ClassVar[str] = "fake"

    def create(self, source: str) -> FakeChannel:
        return FakeChannel()


class RecordingBatcher:
    def __init__(self) -> None:
        self.items: list[Any] = []

    def add(self, item: Any) -> None:
        self.items.append(item)


class RecordingLanes:
    def __init__(self) -> None:
        self.extended: list[tuple[str, int]] = []
        self.returned: list[tuple[str, int]] = []

    def extend(self, handles: Sequence[str], timeout: int) -> None:
        self.extended += [(h, timeout) for h in handles]

    def give_back(self, handles: Sequence[str], timeout: int) -> None:
        self.returned += [(h, timeout) for h in handles]


@dataclass
class Rig:
    worker: Worker
    channel: FakeChannel
    deletes: RecordingBatcher
    lanes: RecordingLanes

    def receive(self, raws: list[dict[str, Any]]) -> None:
        """What a receiver thread does with one ReceiveMessage answer."""
        assert self.worker._reserve(self.worker.config.batch_size)
        self.worker._hand_over(raws)

    def retry_due(self, after: float = 3600.0) -> None:
        """Run the retrier once, as if ``after`` seconds had passed."""
        with self.worker._mutex:
            due, probe, _ = self.worker._take_due(time.monotonic() + after)
        for run in due:
            self.worker._publish(run)
        if probe is not None:
            self.worker._publish(probe)

    @property
    def held(self) -> int:
        return len(self.worker._ledger)


def make_rig(**overrides: Any) -> Rig:
    config = WorkerConfig(target=TARGET, channel=FakeChannelConfig(), **overrides)  # type: ignore[arg-type]
    worker = Worker(config)
    channel = FakeChannel()
    worker._channel = channel
    deletes, lanes = RecordingBatcher(), RecordingLanes()
    worker._deleter = deletes  # type: ignore[assignment]
    worker._visibility = lanes  # type: ignore[assignment]
    return Rig(worker, channel, deletes, lanes)


def raw_message(i: int, receive_count: int = 1, group: str | None = None) -> dict[str, Any]:
    attributes = {"ApproximateReceiveCount": str(receive_count), "SentTimestamp": "1700000000000"}
    if group is not None:
        attributes["MessageGroupId"] = group
    return {
        "MessageId": f"id-{i}",
        "ReceiptHandle": f"rh-{i}",
        "Body": f"body {i}",
        "MD5OfBody": "0" * 32,
        "Attributes": attributes,
        "MessageAttributes": {},
    }


def handed(channel: FakeChannel) -> list[Message]:
    return [m for batch, _ in channel.published for m in batch]


# -- receive and ack ----------------------------------------------------------------------------


def test_hand_over_publishes_one_run_per_message_and_counts() -> None:
    rig = make_rig(batch_size=10)
    rig.receive([raw_message(i) for i in range(3)])
    assert [[m.id for m in batch] for batch, _ in rig.channel.published] == [["id-0"], ["id-1"], ["id-2"]]
    message = handed(rig.channel)[0]
    assert message.ack_id == "rh-0" and message.body == "body 0"
    assert rig.worker.counters.get("received") == 3
    assert rig.worker.counters.get("in_flight") == 3
    assert rig.worker._ledger.reserved == 3  # the 7 reserved but not received are given back


def test_a_fifo_group_of_one_receive_is_one_run_in_order() -> None:
    rig = make_rig()
    rig.receive([raw_message(0, group="a"), raw_message(1, group="b"), raw_message(2, group="a"),
                 raw_message(3, group="a")])
    assert [[m.id for m in batch] for batch, _ in rig.channel.published] == [["id-0", "id-2", "id-3"], ["id-1"]]


def test_ack_queues_a_delete_and_the_message_stays_held_until_deleted() -> None:
    rig = make_rig()
    rig.receive([raw_message(1), raw_message(2)])
    rig.channel.report_all(Outcome.ACK)
    assert rig.deletes.items == ["rh-1", "rh-2"]
    assert rig.lanes.returned == []
    assert rig.worker.counters.get("acked") == 2
    # Acked is not done: both still count against max_in_flight and are still extended.
    assert rig.held == 2 and rig.worker.counters.get("in_flight") == 2
    assert all(h.stage is Stage.DELETING for h in rig.worker._ledger)
    rig.worker._forget(["rh-1"])  # what the delete flush does once DeleteMessageBatch returned
    assert rig.held == 1 and rig.worker._ledger.reserved == 1
    rig.worker._forget(["rh-2"])
    assert rig.held == 0 and rig.worker.counters.get("in_flight") == 0


def test_reject_is_counted_released_and_never_deleted(caplog: pytest.LogCaptureFixture) -> None:
    rig = make_rig()
    rig.receive([raw_message(1)])
    rig.channel.report_last(Outcome.REJECT, "sink answered HTTP 400")
    assert rig.deletes.items == [] and rig.lanes.returned == []
    assert rig.worker.counters.get("rejected") == 1
    assert rig.held == 0 and rig.worker._ledger.reserved == 0
    assert "id-1" in caplog.text and "HTTP 400" in caplog.text


# -- in-place retries ----------------------------------------------------------------------------


def test_a_failed_delivery_is_retried_in_place_then_returned_with_backoff() -> None:
    rig = make_rig(retries=2, nack_backoff_base=2.0, nack_backoff_max=100.0)
    rig.receive([raw_message(1, receive_count=3)])
    rig.channel.report_last(Outcome.RETRY, "sink answered HTTP 503")
    assert rig.lanes.returned == [] and rig.held == 1  # not returned: retried in place
    assert rig.worker.counters.get("retried") == 1
    rig.retry_due()
    assert len(rig.channel.published) == 2  # published again
    rig.channel.report_last(Outcome.RETRY, "sink answered HTTP 503")
    rig.retry_due()
    rig.channel.report_last(Outcome.RETRY, "sink answered HTTP 503")  # the third failure: out of retries
    assert len(rig.channel.published) == 3
    assert [h for h, _ in rig.lanes.returned] == ["rh-1"]
    visibility = rig.lanes.returned[0][1]
    assert 8 * 0.8 - 1 <= visibility <= 8 * 1.2 + 1  # base 2 * 2**(receive count 3 - 1)
    assert rig.held == 0 and rig.worker.counters.get("returned") == 1


def test_a_retry_is_not_due_before_its_backoff() -> None:
    rig = make_rig(retry_backoff_base=5.0)
    rig.receive([raw_message(1)])
    rig.channel.report_last(Outcome.RETRY, "timeout")
    rig.retry_due(after=0.0)
    assert len(rig.channel.published) == 1
    rig.retry_due(after=10.0)
    assert len(rig.channel.published) == 2


def test_the_rest_of_a_fifo_run_is_retried_in_order_after_its_acked_head() -> None:
    rig = make_rig()
    rig.receive([raw_message(i, group="g") for i in range(3)])
    batch, report = rig.channel.published[-1]
    report(batch[0], Outcome.ACK, "")
    report(batch[1], Outcome.RETRY, "503")
    report(batch[2], Outcome.RETRY, "an earlier message of group g was not delivered")
    assert rig.deletes.items == ["rh-0"]
    rig.retry_due()
    assert [m.id for m in rig.channel.published[-1][0]] == ["id-1", "id-2"]


def test_retry_while_stopping_returns_at_once_with_visibility_0() -> None:
    rig = make_rig()
    rig.receive([raw_message(1, receive_count=8)])
    rig.worker.stop()
    rig.channel.report_last(Outcome.RETRY, "channel closed before delivery")
    assert rig.lanes.returned == [("rh-1", 0)]
    assert rig.deletes.items == []


def test_ack_while_stopping_still_deletes() -> None:
    rig = make_rig()
    rig.receive([raw_message(1)])
    rig.worker.stop()
    rig.channel.report_last(Outcome.ACK)
    assert rig.deletes.items == ["rh-1"]


def test_a_late_report_of_an_attempt_given_up_is_ignored() -> None:
    rig = make_rig(max_processing_time=5)
    rig.receive([raw_message(1)])
    held = rig.worker._ledger.get("rh-1")
    assert held is not None
    rig.worker._give_up_attempt(held.run, time.monotonic() + 10)
    assert [h for h, _ in rig.lanes.returned] == ["rh-1"] and rig.held == 0
    rig.channel.report_last(Outcome.ACK)  # the stuck attempt finally answers
    assert rig.deletes.items == [] and rig.worker.counters.get("acked") == 0


def test_overdue_attempts_are_found_by_the_ledger() -> None:
    rig = make_rig(max_processing_time=5)
    rig.receive([raw_message(1), raw_message(2)])
    rig.channel.published[0][1](handed(rig.channel)[0], Outcome.ACK, "")
    now = time.monotonic()
    with rig.worker._mutex:
        assert rig.worker._ledger.overdue_runs(now, 5) == []
        overdue = rig.worker._ledger.overdue_runs(now + 6, 5)
    assert [h.message.id for run in overdue for h in run.entries] == ["id-2"]  # not the acked one


# -- the circuit ---------------------------------------------------------------------------------


def _reserve_in_thread(worker: Worker, n: int) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def run() -> None:
        result["ok"] = worker._reserve(n)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def test_an_outage_opens_the_circuit_parks_everything_and_returns_nothing() -> None:
    rig = make_rig(circuit_threshold=5, retries=1, max_in_flight=100)
    for start in range(0, 50, 10):
        rig.receive([raw_message(i) for i in range(start, start + 10)])
    rig.channel.report_all(Outcome.RETRY, "ConnectionRefusedError")
    assert rig.worker._circuit.is_open
    assert rig.worker.counters.get("circuit_open") == 1
    assert rig.lanes.returned == []  # an outage gives nothing back
    assert rig.held == 50
    # Receiving pauses although there is room.
    thread, result = _reserve_in_thread(rig.worker, 10)
    thread.join(0.7)
    assert thread.is_alive() and "ok" not in result
    # Probes: one message at a time, failing many times, never counted against its retries.
    for _ in range(10):
        before = len(rig.channel.published)
        rig.retry_due()
        assert len(rig.channel.published) == before + 1
        assert len(rig.channel.published[-1][0]) == 1
        rig.channel.report_last(Outcome.RETRY, "ConnectionRefusedError")
    assert rig.lanes.returned == [] and rig.held == 50
    # The sink is back: the probe succeeds, the circuit closes, receiving resumes, all go out.
    rig.retry_due()
    rig.channel.report_last(Outcome.ACK)
    assert not rig.worker._circuit.is_open
    thread.join(2.0)
    assert result.get("ok") is True
    before = len(rig.channel.published)
    rig.retry_due(after=0.0)
    assert len(rig.channel.published) == before + 49
    assert rig.lanes.returned == []


def test_successes_in_between_keep_the_circuit_closed() -> None:
    rig = make_rig(circuit_threshold=3)
    rig.receive([raw_message(i) for i in range(10)])
    batch = rig.channel.published
    for i, (messages, report) in enumerate(batch):
        report(messages[0], Outcome.RETRY if i % 3 != 2 else Outcome.ACK, "503")
    assert not rig.worker._circuit.is_open


# -- reports from anywhere -----------------------------------------------------------------------


@pytest.mark.parametrize(("first", "second"), [
    (Outcome.ACK, Outcome.ACK), (Outcome.RETRY, Outcome.ACK), (Outcome.ACK, Outcome.RETRY),
    (Outcome.REJECT, Outcome.ACK), (Outcome.RETRY, Outcome.REJECT),
])
def test_double_report_is_ignored(first: Outcome, second: Outcome) -> None:
    rig = make_rig()
    rig.receive([raw_message(1), raw_message(2)])
    message, report = rig.channel.published[0][0][0], rig.channel.published[0][1]
    report(message, first, "first")
    before = (list(rig.deletes.items), list(rig.lanes.returned), rig.worker.counters.snapshot(), rig.held)
    report(message, second, "second")
    assert (rig.deletes.items, rig.lanes.returned, rig.worker.counters.snapshot(), rig.held) == before


def test_report_of_a_message_not_in_the_run_is_ignored() -> None:
    rig = make_rig()
    rig.receive([raw_message(1)])
    stranger = Message(id="x", body="", ack_id="not-held")
    rig.channel.published[0][1](stranger, Outcome.ACK, "")
    assert rig.deletes.items == [] and rig.held == 1


def test_reports_from_many_threads() -> None:
    rig = make_rig(batch_size=10, max_in_flight=1000, circuit_threshold=10_000, retries=0)
    for start in range(0, 500, 10):
        rig.receive([raw_message(i) for i in range(start, start + 10)])
    published = list(rig.channel.published)

    def report_all(outcome: Outcome) -> None:
        for batch, report in published:  # every thread reports every message: only the first counts
            for m in batch:
                report(m, outcome if int(m.id[3:]) % 2 else Outcome.ACK, "")

    threads = [threading.Thread(target=report_all, args=(o,)) for o in (Outcome.ACK, Outcome.RETRY) * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    returned = {h for h, _ in rig.lanes.returned}
    assert len(rig.deletes.items) + len(returned) == 500
    assert len(set(rig.deletes.items) | returned) == 500
    rig.worker._forget(rig.deletes.items)
    assert rig.held == 0 and rig.worker._ledger.reserved == 0


# -- in-flight bound ----------------------------------------------------------------------------


def test_reserve_blocks_at_max_in_flight_until_deletes_return() -> None:
    rig = make_rig(batch_size=5, max_in_flight=10)
    rig.receive([raw_message(i) for i in range(5)])
    rig.receive([raw_message(i) for i in range(5, 10)])
    thread, result = _reserve_in_thread(rig.worker, 5)
    thread.join(0.7)  # longer than the reserve's internal wait
    assert thread.is_alive() and "ok" not in result, "receiving went on above max_in_flight"
    rig.channel.report_all(Outcome.ACK)
    thread.join(0.7)
    assert thread.is_alive() and "ok" not in result, "acked but undeleted messages must count"
    rig.worker._forget(rig.deletes.items[:5])
    thread.join(2.0)
    assert not thread.is_alive() and result["ok"] is True


def test_reserve_returns_false_when_stopping() -> None:
    rig = make_rig(batch_size=10, max_in_flight=10)
    rig.receive([raw_message(i) for i in range(10)])
    thread, result = _reserve_in_thread(rig.worker, 10)
    thread.join(0.2)
    assert thread.is_alive()
    rig.worker.stop()
    thread.join(2.0)
    assert not thread.is_alive()
    assert result["ok"] is False
    assert rig.worker._ledger.reserved == 10  # nothing reserved by the refused call
    assert rig.worker._reserve(1) is False  # and no more once stopping


def test_partial_receive_gives_back_its_reservation() -> None:
    rig = make_rig(batch_size=10, max_in_flight=20)
    rig.receive([raw_message(i) for i in range(3)])
    rig.receive([])
    assert rig.worker._ledger.reserved == 3
    assert rig.worker._reserve(10) and rig.worker._reserve(7)
    assert rig.worker._ledger.reserved == 20


def test_return_of_a_message_received_very_often_is_capped() -> None:
    rig = make_rig(retries=0, nack_backoff_base=2.0, nack_backoff_max=300.0)
    rig.receive([raw_message(1, receive_count=5000)])
    rig.channel.report_last(Outcome.RETRY, "sink down for days")
    assert rig.lanes.returned and rig.lanes.returned[0][1] <= 360


# -- extension ----------------------------------------------------------------------------------


def test_extension_covers_delivering_waiting_and_deleting_messages() -> None:
    rig = make_rig(visibility_timeout=10)
    rig.receive([raw_message(i) for i in range(3)])
    published = rig.channel.published
    published[0][1](published[0][0][0], Outcome.ACK, "")  # deleting
    published[1][1](published[1][0][0], Outcome.RETRY, "503")  # waiting for a retry
    now = time.monotonic()
    with rig.worker._mutex:
        assert rig.worker._ledger.due_for_extension(now, 5, 10) == []  # not yet
        due = rig.worker._ledger.due_for_extension(now + 6, 5, 10)
        assert sorted(due) == ["rh-0", "rh-1", "rh-2"]
        assert rig.worker._ledger.due_for_extension(now + 6, 5, 10) == []  # marked as extended
