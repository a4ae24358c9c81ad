"""poller/worker.Worker without SQS: report() outcomes and the in-flight bound.

A fake channel takes the batches; the delete and nack batchers are replaced by recorders. No
thread of the worker is started (``run`` is not called), so nothing talks to SQS.
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
from poller.sqs import SqsTarget
from poller.worker import Worker

TARGET = SqsTarget(queue_url="http://127.0.0.1:9/000000000000/q", region="us-east-1",
                   endpoint_url="http://127.0.0.1:9")


class FakeChannel(Channel):
    def __init__(self) -> None:
        self.published: list[tuple[list[Message], Report]] = []

    def publish(self, batch: Sequence[Message], report: Report) -> None:
        self.published.append((list(batch), report))


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

    def start(self) -> None:
        pass

    def close(self, timeout: float) -> bool:
        return True


def make_worker(**overrides: Any) -> tuple[Worker, FakeChannel, RecordingBatcher, RecordingBatcher]:
    config = WorkerConfig(target=TARGET, channel=FakeChannelConfig(), **overrides)  # type: ignore[arg-type]
    worker = Worker(config)
    channel = FakeChannel()
    worker._channel = channel
    deleter, nacker = RecordingBatcher(), RecordingBatcher()
    worker._deleter = deleter  # type: ignore[assignment]
    worker._nacker = nacker  # type: ignore[assignment]
    return worker, channel, deleter, nacker


def raw_message(i: int, receive_count: int = 1) -> dict[str, Any]:
    return {
        "MessageId": f"id-{i}",
        "ReceiptHandle": f"rh-{i}",
        "Body": f"body {i}",
        "MD5OfBody": "0" * 32,
        "Attributes": {"ApproximateReceiveCount": str(receive_count), "SentTimestamp": "1700000000000"},
        "MessageAttributes": {},
    }


def receive(worker: Worker, raws: list[dict[str, Any]]) -> None:
    """What a receiver thread does with one ReceiveMessage answer."""
    assert worker._reserve(worker.config.batch_size)
    worker._hand_over(raws)


def handed(channel: FakeChannel) -> list[Message]:
    return [m for batch, _ in channel.published for m in batch]


def test_hand_over_publishes_and_counts() -> None:
    worker, channel, _, _ = make_worker(batch_size=10)
    receive(worker, [raw_message(i) for i in range(3)])
    messages = handed(channel)
    assert [m.id for m in messages] == ["id-0", "id-1", "id-2"]
    assert messages[0].ack_id == "rh-0" and messages[0].body == "body 0"
    assert messages[0].attributes["ApproximateReceiveCount"] == "1"
    assert channel.published[0][1] == worker.report
    assert worker.counters.get("received") == 3
    assert worker.counters.get("in_flight") == 3
    assert worker._reserved == 3  # the 7 reserved but not received are given back


def test_ack_queues_a_delete() -> None:
    worker, channel, deleter, nacker = make_worker()
    receive(worker, [raw_message(1), raw_message(2)])
    first, second = handed(channel)
    worker.report(first, Outcome.ACK, "")
    assert deleter.items == ["rh-1"]
    assert nacker.items == []
    assert worker.counters.get("acked") == 1
    assert worker.counters.get("in_flight") == 1
    assert worker._reserved == 1
    worker.report(second, Outcome.ACK, "")
    assert deleter.items == ["rh-1", "rh-2"]
    assert worker.counters.get("in_flight") == 0 and worker._reserved == 0


@pytest.mark.parametrize(("receive_count", "nominal"), [(1, 2.0), (2, 4.0), (4, 16.0), (6, 64.0), (20, 100.0)])
def test_retry_nacks_with_backoff_from_receive_count(receive_count: int, nominal: float) -> None:
    worker, channel, deleter, nacker = make_worker(nack_backoff_base=2.0, nack_backoff_max=100.0)
    receive(worker, [raw_message(i, receive_count) for i in range(10)])
    for message in handed(channel):
        worker.report(message, Outcome.RETRY, "sink answered HTTP 503")
    assert deleter.items == []
    assert [h for h, _ in nacker.items] == [f"rh-{i}" for i in range(10)]
    for _, visibility in nacker.items:
        assert isinstance(visibility, int)
        assert round(nominal * 0.8) - 1 <= visibility <= round(nominal * 1.2) + 1, visibility
    assert worker.counters.get("retried") == 10
    assert worker._reserved == 0


def test_retry_passes_receive_count_and_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, float, float]] = []

    def fake(receive_count: int, *, base: float, cap: float) -> int:
        calls.append((receive_count, base, cap))
        return 77

    monkeypatch.setattr("poller.worker.nack_visibility", fake)
    worker, channel, _, nacker = make_worker(nack_backoff_base=3.0, nack_backoff_max=60.0)
    receive(worker, [raw_message(1, receive_count=5)])
    worker.report(handed(channel)[0], Outcome.RETRY, "timeout")
    assert calls == [(5, 3.0, 60.0)]
    assert nacker.items == [("rh-1", 77)]


def test_retry_without_receive_count_counts_as_first() -> None:
    worker, channel, _, nacker = make_worker(nack_backoff_base=2.0, nack_backoff_max=100.0)
    raw = raw_message(1)
    del raw["Attributes"]["ApproximateReceiveCount"]
    receive(worker, [raw])
    worker.report(handed(channel)[0], Outcome.RETRY, "x")
    assert 1 <= nacker.items[0][1] <= 3


def test_retry_while_stopping_makes_visible_at_once() -> None:
    worker, channel, deleter, nacker = make_worker(nack_backoff_base=2.0)
    receive(worker, [raw_message(1, receive_count=8)])
    worker.stop()
    worker.report(handed(channel)[0], Outcome.RETRY, "channel closed before delivery")
    assert nacker.items == [("rh-1", 0)]
    assert deleter.items == []


def test_ack_while_stopping_still_deletes() -> None:
    worker, channel, deleter, _ = make_worker()
    receive(worker, [raw_message(1)])
    worker.stop()
    worker.report(handed(channel)[0], Outcome.ACK, "")
    assert deleter.items == ["rh-1"]


def test_reject_is_counted_and_never_deleted(caplog: pytest.LogCaptureFixture) -> None:
    worker, channel, deleter, nacker = make_worker()
    receive(worker, [raw_message(1)])
    worker.report(handed(channel)[0], Outcome.REJECT, "sink answered HTTP 400")
    assert deleter.items == [] and nacker.items == []
    assert worker.counters.get("rejected") == 1
    assert worker.counters.get("in_flight") == 0 and worker._reserved == 0
    assert "id-1" in caplog.text and "HTTP 400" in caplog.text


@pytest.mark.parametrize(("first", "second"), [
    (Outcome.ACK, Outcome.ACK), (Outcome.RETRY, Outcome.ACK), (Outcome.ACK, Outcome.RETRY),
    (Outcome.REJECT, Outcome.ACK), (Outcome.RETRY, Outcome.REJECT),
])
def test_double_report_is_ignored(first: Outcome, second: Outcome) -> None:
    worker, channel, deleter, nacker = make_worker()
    receive(worker, [raw_message(1), raw_message(2)])
    message = handed(channel)[0]
    worker.report(message, first, "first")
    before = (list(deleter.items), list(nacker.items), worker.counters.snapshot(), worker._reserved)
    worker.report(message, second, "second")
    assert (deleter.items, nacker.items, worker.counters.snapshot(), worker._reserved) == before
    assert worker._reserved == 1  # the other message is still held


def test_report_of_an_unknown_message_is_ignored() -> None:
    worker, _, deleter, nacker = make_worker()
    stranger = Message(id="x", body="", ack_id="not-in-flight")
    worker.report(stranger, Outcome.ACK, "")
    assert deleter.items == [] and nacker.items == [] and worker._reserved == 0


def test_reports_from_many_threads() -> None:
    worker, channel, deleter, nacker = make_worker(batch_size=10, max_in_flight=1000)
    for start in range(0, 500, 10):
        receive(worker, [raw_message(i) for i in range(start, start + 10)])
    messages = handed(channel)

    def report_all(outcome: Outcome) -> None:
        for m in messages:  # every thread reports every message: only the first may count
            worker.report(m, outcome if int(m.id[3:]) % 2 else Outcome.ACK, "")

    threads = [threading.Thread(target=report_all, args=(o,)) for o in (Outcome.ACK, Outcome.RETRY) * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(deleter.items) + len(nacker.items) == 500
    assert len(set(deleter.items) | {h for h, _ in nacker.items}) == 500
    assert worker._reserved == 0 and worker.counters.get("in_flight") == 0


# -- in-flight bound ----------------------------------------------------------------------------


def _reserve_in_thread(worker: Worker, n: int) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def run() -> None:
        result["ok"] = worker._reserve(n)
        result["at"] = time.monotonic()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def test_reserve_blocks_at_max_in_flight_and_unblocks_on_report() -> None:
    worker, channel, _, _ = make_worker(batch_size=5, max_in_flight=10)
    receive(worker, [raw_message(i) for i in range(5)])
    receive(worker, [raw_message(i) for i in range(5, 10)])
    assert worker._reserved == 10
    messages = handed(channel)

    thread, result = _reserve_in_thread(worker, 5)
    time.sleep(0.7)  # longer than the reserve's internal wait
    assert thread.is_alive() and "ok" not in result, "receiving went on above max_in_flight"

    for m in messages[:4]:  # 6 held: another batch of 5 still does not fit
        worker.report(m, Outcome.ACK, "")
    time.sleep(0.7)
    assert thread.is_alive() and "ok" not in result

    reported = time.monotonic()
    worker.report(messages[4], Outcome.RETRY, "")  # 5 held: now it fits
    thread.join(2.0)
    assert not thread.is_alive(), "reserve did not unblock after reports made room"
    assert result["ok"] is True
    assert result["at"] - reported < 1.0
    assert worker._reserved == 10


def test_reserve_returns_false_when_stopping() -> None:
    worker, _, _, _ = make_worker(batch_size=10, max_in_flight=10)
    receive(worker, [raw_message(i) for i in range(10)])
    thread, result = _reserve_in_thread(worker, 10)
    time.sleep(0.2)
    assert thread.is_alive()
    worker.stop()
    thread.join(2.0)
    assert not thread.is_alive()
    assert result["ok"] is False
    assert worker._reserved == 10  # nothing reserved by the refused call
    assert worker._reserve(1) is False  # and no more once stopping


def test_partial_receive_gives_back_its_reservation() -> None:
    worker, _, _, _ = make_worker(batch_size=10, max_in_flight=20)
    receive(worker, [raw_message(i) for i in range(3)])
    receive(worker, [])
    assert worker._reserved == 3
    assert worker._reserve(10) and worker._reserve(7)
    assert worker._reserved == 20


def test_retry_of_a_message_received_very_often() -> None:
    worker, channel, _, nacker = make_worker(nack_backoff_base=2.0, nack_backoff_max=300.0)
    receive(worker, [raw_message(1, receive_count=5000)])
    worker.report(handed(channel)[0], Outcome.RETRY, "sink down for days")
    assert nacker.items and nacker.items[0][1] <= 360
