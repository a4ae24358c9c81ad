"""The worker's parts without SQS: outcomes, in-place retries, the circuit, the FIFO sequencer,
pacing, the in-flight bound, receiving.

Each test runs on a real event loop with the parts wired as ``poller.worker`` wires them, through
their constructors: a fake channel takes the runs, the delete batcher and the visibility lanes
are recorders, and time is a fake clock the test moves. Nothing talks to SQS; the dispatcher's
timers (retries, pacing, probes) are fired by the test instead of waited for.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest

from channels.base import Channel, Message, Outcome, Report
from poller.acker import Acker
from poller.circuit import Circuit
from poller.config import WorkerConfig
from poller.dispatcher import Dispatcher, Pacing, RetryPolicy
from poller.gate import Gate
from poller.ledger import Held, Ledger, Room, Run, Stage
from poller.receiver import Budget, Polls, Receiver
from poller.sqs import SqsTarget
from poller.stats import Counters
from poller.watchdog import Watchdog

TARGET = SqsTarget(queue_url="http://127.0.0.1:9/000000000000/q", region="us-east-1",
                   endpoint_url="http://127.0.0.1:9")


def on_loop(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an ``async def`` test on a fresh event loop."""
    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeChannel(Channel):
    def __init__(self, keeps_order: bool = False) -> None:
        self.published: list[tuple[list[Message], Report]] = []
        self.keeps_order = keeps_order

    def publish(self, batch: Sequence[Message], report: Report) -> None:
        self.published.append((list(batch), report))

    def report_last(self, outcome: Outcome, reason: str = "", retry_after: float = 0.0) -> None:
        """Report every message of the last publish."""
        batch, report = self.published[-1]
        for message in batch:
            report(message, outcome, reason, retry_after)

    def report_all(self, outcome: Outcome, reason: str = "") -> None:
        for batch, report in self.published:
            for message in batch:
                report(message, outcome, reason)

    def ids(self, index: int = -1) -> list[str]:
        return [m.id for m in self.published[index][0]]


@dataclass(frozen=True)
class FakeChannelConfig:
    name: ClassVar[str] = "fake"
    attempt_timeout: float = 30.0

    def create(self, source: str) -> FakeChannel:
        return FakeChannel()


class RecordingDeleter:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, handle: str) -> None:
        self.items.append(handle)


class RecordingLanes:
    def __init__(self) -> None:
        self.extended: list[tuple[str, int]] = []
        self.returned: list[tuple[str, int]] = []
        self.return_calls: list[tuple[list[str], set[str | None], int]] = []

    def extend(self, items: Sequence[tuple[str, str | None]], timeout: int) -> None:
        self.extended += [(h, timeout) for h, _ in items]

    def give_back(self, items: Sequence[tuple[str, str | None]], timeout: int) -> None:
        self.returned += [(h, timeout) for h, _ in items]
        self.return_calls.append(([h for h, _ in items], {g for _, g in items}, timeout))


class Sqs:
    """Answers ReceiveMessage with what ``answers`` holds, then waits like an empty long poll."""

    def __init__(self) -> None:
        self.answers: asyncio.Queue[list[Message] | Exception] = asyncio.Queue()

    async def receive(self, *, max_messages: int, wait_time: int,
                      visibility_timeout: int | None = None) -> list[Message]:
        answer = await self.answers.get()
        if isinstance(answer, Exception):
            raise answer
        return answer


@dataclass
class Rig:
    config: WorkerConfig
    clock: FakeClock
    counters: Counters
    ledger: Ledger
    gate: Gate
    polls: Polls
    acker: Acker
    dispatcher: Dispatcher
    receiver: Receiver
    channel: FakeChannel
    deletes: RecordingDeleter
    lanes: RecordingLanes
    sqs: Sqs
    failures: list[str]

    async def receive(self, messages: list[Message]) -> None:
        """What a receiver does with one ReceiveMessage answer."""
        assert await self.receiver.reserve(self.config.batch_size)
        self.receiver.take(messages)

    def stop(self) -> None:
        """What the worker does on SIGTERM."""
        self.receiver.stop()
        self.dispatcher.stop()

    def fire_timers(self) -> None:
        """Run every retry or paced publish that is scheduled, as if its time had come."""
        for run in list(self.dispatcher._timers):
            self.dispatcher._due(run)

    def probe(self) -> None:
        """Let the circuit's next probe go out now."""
        self.gate.circuit.next_probe_at = 0.0
        self.dispatcher._probe()

    def delay_of_timers(self) -> list[float]:
        loop = asyncio.get_running_loop()
        return sorted(h.when() - loop.time() for h in self.dispatcher._timers.values())

    @property
    def held(self) -> int:
        return len(self.ledger)


def make_rig(*, keeps_order: bool = False, channel: FakeChannel | None = None, **overrides: Any) -> Rig:
    """The worker's parts wired to fakes, on the running loop (as ``Worker._assemble`` does)."""
    config = WorkerConfig(target=TARGET, channel=FakeChannelConfig(), **overrides)  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    clock, counters = FakeClock(), Counters()
    channel = channel or FakeChannel(keeps_order)
    deletes, lanes, sqs, failures = RecordingDeleter(), RecordingLanes(), Sqs(), []
    ledger = Ledger(config.max_in_flight)
    room = Room(ledger, config.batch_size, loop, recheck=0.01)
    gate = Gate(Circuit(threshold=config.circuit_threshold), ledger)
    polls = Polls(config.wait_time, clock)
    acker = Acker(ledger=ledger, room=room, deletes=deletes, visibility=lanes, counters=counters,
                  nack_base=config.nack_backoff, nack_cap=config.nack_backoff_max)
    dispatcher = Dispatcher(
        channel=channel, ledger=ledger, room=room, gate=gate, acker=acker, counters=counters, loop=loop,
        clock=clock, fail=failures.append, stop_visibility=polls.stop_visibility,
        visibility_timeout=config.effective_visibility_timeout,
        retry=RetryPolicy(config.retries, config.retry_backoff_base, config.retry_backoff_max),
        pacing=Pacing(config.max_rate),
    )
    receiver = Receiver(config, sqs=sqs, ledger=ledger, room=room, gate=gate, polls=polls, budget=Budget(None),
                        hand_over=dispatcher.hand_over, counters=counters, watchdog=Watchdog(), clock=clock)
    return Rig(config, clock, counters, ledger, gate, polls, acker, dispatcher, receiver, channel, deletes, lanes,
               sqs, failures)


def raw_message(i: int, receive_count: int = 1, group: str | None = None) -> Message:
    """A message as ``SqsClient.receive`` gives it."""
    attributes = {"ApproximateReceiveCount": str(receive_count), "SentTimestamp": "1700000000000"}
    if group is not None:
        attributes["MessageGroupId"] = group
    return Message(id=f"id-{i}", body=f"body {i}", ack_id=f"rh-{i}", attributes=attributes,
                   message_attributes={}, md5_of_body="0" * 32)


def handed(channel: FakeChannel) -> list[Message]:
    return [m for batch, _ in channel.published for m in batch]


# -- receive and ack ----------------------------------------------------------------------------


@on_loop
async def test_hand_over_publishes_one_run_per_message_and_counts() -> None:
    rig = make_rig(batch_size=10)
    await rig.receive([raw_message(i) for i in range(3)])
    assert [rig.channel.ids(i) for i in range(3)] == [["id-0"], ["id-1"], ["id-2"]]
    message = handed(rig.channel)[0]
    assert message.ack_id == "rh-0" and message.body == "body 0"
    assert rig.counters.get("received") == 3
    assert rig.held == 3
    assert rig.ledger.reserved == 3  # the 7 reserved but not received are given back


@on_loop
async def test_a_receipt_handle_held_already_is_not_published_again_and_its_room_goes_back() -> None:
    rig = make_rig(batch_size=10)
    await rig.receive([raw_message(0), raw_message(1, group="g"), raw_message(2, group="g")])
    await rig.receive([raw_message(0), raw_message(1, group="g"), raw_message(2, group="g"), raw_message(3)])
    assert sorted(m.id for m in handed(rig.channel)) == ["id-0", "id-1", "id-3"]  # id-2 waits for id-1
    assert rig.held == 4
    assert rig.ledger.reserved == 4


@on_loop
async def test_ack_queues_a_delete_and_the_message_stays_held_until_deleted() -> None:
    rig = make_rig()
    await rig.receive([raw_message(1), raw_message(2)])
    rig.channel.report_all(Outcome.ACK)
    assert rig.deletes.items == ["rh-1", "rh-2"]
    assert rig.lanes.returned == []
    assert rig.counters.get("acked") == 2
    # Acked is not done: both still count against max_in_flight and are still extended.
    assert rig.held == 2
    assert all(h.stage is Stage.DELETING for h in rig.ledger)
    rig.acker.deleted(["rh-1"])  # what the delete batcher says once DeleteMessageBatch returned
    assert rig.held == 1 and rig.ledger.reserved == 1
    rig.acker.deleted(["rh-2"])
    assert rig.held == 0


@on_loop
async def test_a_delivered_message_is_freed_once_deleted_without_the_cycle_collector() -> None:
    """Held -> Run -> entries -> Held was a cycle for every delivered message: each waited for a
    collection, and the collector walked them all (a worker draining 20,000 messages into Kafka
    spent 67-70 ms collecting, 19-20 ms without the cycle)."""
    rig = make_rig()
    gc.collect()
    gc.disable()
    try:
        await rig.receive([raw_message(1)])
        held = rig.ledger.get("rh-1")
        assert held is not None
        ours = {id(held), id(held.run)}  # not references: they would keep them alive
        del held
        rig.channel.report_all(Outcome.ACK)
        rig.acker.deleted(["rh-1"])
        assert rig.held == 0
        left = [type(o).__name__ for o in gc.get_objects() if isinstance(o, Held | Run) and id(o) in ours]
        assert left == []
    finally:
        gc.enable()


@on_loop
async def test_reject_is_counted_released_and_never_deleted(caplog: pytest.LogCaptureFixture) -> None:
    rig = make_rig()
    await rig.receive([raw_message(1)])
    rig.channel.report_last(Outcome.REJECT, "sink answered HTTP 400")
    assert rig.deletes.items == [] and rig.lanes.returned == []
    assert rig.counters.get("rejected") == 1
    assert rig.held == 0 and rig.ledger.reserved == 0
    assert "id-1" in caplog.text and "HTTP 400" in caplog.text


# -- in-place retries ----------------------------------------------------------------------------


@on_loop
async def test_a_failed_delivery_is_retried_in_place_then_returned_with_backoff() -> None:
    rig = make_rig(retries=2, nack_backoff=2.0, nack_backoff_max=100.0)
    await rig.receive([raw_message(1, receive_count=3)])
    rig.channel.report_last(Outcome.RETRY, "sink answered HTTP 503")
    assert rig.lanes.returned == [] and rig.held == 1  # not returned: retried in place
    assert rig.counters.get("retried") == 1
    rig.fire_timers()
    assert len(rig.channel.published) == 2  # published again
    rig.channel.report_last(Outcome.RETRY, "sink answered HTTP 503")
    rig.fire_timers()
    rig.channel.report_last(Outcome.RETRY, "sink answered HTTP 503")  # the third failure: out of retries
    assert len(rig.channel.published) == 3
    assert [h for h, _ in rig.lanes.returned] == ["rh-1"]
    visibility = rig.lanes.returned[0][1]
    assert 8 * 0.8 - 1 <= visibility <= 8 * 1.2 + 1  # base 2 * 2**(receive count 3 - 1)
    assert rig.held == 0 and rig.counters.get("returned") == 1


@on_loop
async def test_a_retry_waits_its_backoff_or_the_sinks_retry_after() -> None:
    rig = make_rig(retry_backoff_base=5.0, retry_backoff_max=8.0)
    await rig.receive([raw_message(1), raw_message(2)])
    rig.channel.published[0][1](handed(rig.channel)[0], Outcome.RETRY, "503")
    rig.channel.published[1][1](handed(rig.channel)[1], Outcome.RETRY, "429", 30.0)
    first, second = rig.delay_of_timers()
    assert 3.5 < first <= 8.0  # 5 s +/- jitter
    assert 29.0 < second <= 30.0  # Retry-After: 30


@on_loop
async def test_retry_while_stopping_returns_once_the_long_polls_have_ended() -> None:
    """What a stop gives back must not be handed to the long polls still in flight (this
    process's, or those of the processes stopped with it): visible again once they have ended,
    not at once, nor after the nack backoff (receive count 8)."""
    rig = make_rig(wait_time=20)
    await rig.receive([raw_message(1, receive_count=8), raw_message(2)])
    rig.stop()
    rig.channel.published[0][1](handed(rig.channel)[0], Outcome.RETRY, "channel closed before delivery")
    [(handle, visibility)] = rig.lanes.returned
    assert handle == "rh-1" and 20 <= visibility <= 21
    rig.clock.advance(25)  # the polls' wait has passed: nothing can take it any more
    rig.channel.published[1][1](handed(rig.channel)[1], Outcome.RETRY, "channel closed before delivery")
    assert rig.lanes.returned[1] == ("rh-2", 0)
    assert rig.deletes.items == []


@on_loop
async def test_ack_while_stopping_still_deletes() -> None:
    rig = make_rig()
    await rig.receive([raw_message(1)])
    rig.stop()
    rig.channel.report_last(Outcome.ACK)
    assert rig.deletes.items == ["rh-1"]


@on_loop
async def test_an_attempt_given_up_is_a_failure_like_any_other() -> None:
    """A channel that did not answer within --max-processing-time (past its own deadline): the
    attempt counts as failed for the circuit, is retried in place, then returned; its late
    report is ignored."""
    rig = make_rig(max_processing_time=31, retries=1)
    await rig.receive([raw_message(1)])
    held = rig.ledger.get("rh-1")
    assert held is not None
    rig.clock.advance(40)
    rig.dispatcher.give_up_overdue(rig.clock(), 31)
    assert rig.lanes.returned == [] and rig.held == 1 and held.stage is Stage.WAITING
    assert rig.gate.circuit._consecutive == 1
    rig.channel.report_last(Outcome.ACK)  # the stuck attempt finally answers: too late
    assert rig.deletes.items == [] and rig.counters.get("acked") == 0
    rig.fire_timers()
    rig.clock.advance(40)
    rig.dispatcher.give_up_overdue(rig.clock(), 31)  # out of retries
    assert [h for h, _ in rig.lanes.returned] == ["rh-1"] and rig.held == 0


@on_loop
async def test_max_processing_time_must_be_above_the_channels_own_deadline() -> None:
    with pytest.raises(ValueError, match="must be above the fake channel's deadline"):
        make_rig(max_processing_time=30)
    make_rig(max_processing_time=31)


@on_loop
async def test_overdue_attempts_are_found_by_the_ledger() -> None:
    rig = make_rig(max_processing_time=31)
    await rig.receive([raw_message(1), raw_message(2)])
    rig.channel.published[0][1](handed(rig.channel)[0], Outcome.ACK, "")
    now = rig.clock()
    assert rig.ledger.overdue_runs(now, 5) == []
    overdue = rig.ledger.overdue_runs(now + 6, 5)
    assert [h.message.id for run in overdue for h in run.entries] == ["id-2"]  # not the acked one


# -- the FIFO sequencer --------------------------------------------------------------------------


@on_loop
async def test_a_fifo_group_goes_one_message_at_a_time_to_a_channel_that_does_not_keep_order() -> None:
    rig = make_rig()
    await rig.receive([raw_message(0, group="a"), raw_message(1, group="b"), raw_message(2, group="a"),
                       raw_message(3, group="a")])
    assert [rig.channel.ids(i) for i in range(2)] == [["id-0"], ["id-1"]]
    rig.channel.published[0][1](handed(rig.channel)[0], Outcome.ACK, "")
    assert rig.channel.ids() == ["id-2"]  # only now the group's next
    rig.channel.report_last(Outcome.ACK)
    assert rig.channel.ids() == ["id-3"]
    assert rig.deletes.items == ["rh-0", "rh-2"]


@on_loop
async def test_a_failed_fifo_message_stops_its_group_and_is_retried_first() -> None:
    rig = make_rig()
    await rig.receive([raw_message(i, group="g") for i in range(3)])
    rig.channel.report_last(Outcome.ACK)
    rig.channel.report_last(Outcome.RETRY, "503")  # id-1 fails: id-2 is not sent
    assert [m.id for m in handed(rig.channel)] == ["id-0", "id-1"]
    rig.fire_timers()
    assert rig.channel.ids() == ["id-1"]  # the failed one first, then the rest
    rig.channel.report_last(Outcome.ACK)
    assert rig.channel.ids() == ["id-2"]


@on_loop
async def test_a_rejected_fifo_message_goes_to_the_dlq_and_its_group_goes_on() -> None:
    rig = make_rig()
    await rig.receive([raw_message(i, group="g") for i in range(2)])
    rig.channel.report_last(Outcome.REJECT, "400")
    assert rig.channel.ids() == ["id-1"] and rig.counters.get("rejected") == 1


@on_loop
async def test_a_channel_that_keeps_order_gets_the_group_at_once_and_nothing_is_acked_past_a_failure() -> None:
    rig = make_rig(keeps_order=True)
    await rig.receive([raw_message(i, group="g") for i in range(4)])
    assert rig.channel.ids() == ["id-0", "id-1", "id-2", "id-3"]
    batch, report = rig.channel.published[-1]
    for message, outcome in zip(batch, (Outcome.ACK, Outcome.RETRY, Outcome.ACK, Outcome.ACK), strict=True):
        report(message, outcome, "")
    assert rig.deletes.items == ["rh-0"]  # id-2 and id-3 were delivered after a failed id-1
    rig.fire_timers()
    assert rig.channel.ids() == ["id-1", "id-2", "id-3"]


@on_loop
async def test_a_fifo_run_goes_back_in_one_call_head_first_with_one_visibility() -> None:
    """Given back, a group's later message must not be visible before its head: one visibility
    for all (the longest of theirs: receive counts differ) and head first (LocalStack frees a
    group as soon as any of its held messages is visible again; order broke in every run)."""
    rig = make_rig(retries=0, nack_backoff=2.0, nack_backoff_max=100.0, keeps_order=True)
    await rig.receive([raw_message(0, receive_count=1, group="g"), raw_message(1, receive_count=4, group="g"),
                       raw_message(2, receive_count=2, group="g")])
    rig.channel.report_last(Outcome.RETRY, "503")
    [(handles, groups, visibility)] = rig.lanes.return_calls
    assert handles == ["rh-0", "rh-1", "rh-2"] and groups == {"g"}
    assert 16 * 0.8 - 1 <= visibility <= 16 * 1.2 + 1  # receive count 4's: 2 * 2**3


# -- pacing --------------------------------------------------------------------------------------


@on_loop
async def test_max_rate_paces_what_goes_to_the_channel() -> None:
    rig = make_rig(max_rate=10.0)
    await rig.receive([raw_message(i) for i in range(5)])
    assert len(rig.channel.published) == 1  # the first now, the rest 0.1 s apart
    delays = rig.delay_of_timers()
    assert len(delays) == 4 and 0.35 < delays[-1] <= 0.4
    rig.fire_timers()
    assert len(rig.channel.published) == 5


# -- the circuit ---------------------------------------------------------------------------------


def _reserve_in_task(rig: Rig, n: int) -> asyncio.Task[bool]:
    return asyncio.get_running_loop().create_task(rig.receiver.reserve(n))


async def _blocked(task: asyncio.Task[bool]) -> bool:
    """Whether the reserve is still waiting after many of its rechecks (every 0.01 s here)."""
    await asyncio.sleep(0.1)
    return not task.done()


@on_loop
async def test_an_outage_opens_the_circuit_parks_everything_and_returns_nothing() -> None:
    rig = make_rig(circuit_threshold=5, retries=1, max_in_flight=100)
    for start in range(0, 50, 10):
        await rig.receive([raw_message(i) for i in range(start, start + 10)])
    rig.channel.report_all(Outcome.RETRY, "ConnectionRefusedError")
    assert rig.gate.is_open
    assert rig.counters.get("circuit_open") == 1
    rig.fire_timers()  # the retries due from before the circuit opened are parked when they come
    assert rig.lanes.returned == []  # an outage gives nothing back
    assert rig.held == 50
    # Receiving pauses although there is room.
    reserving = _reserve_in_task(rig, 10)
    assert await _blocked(reserving)
    # Probes: one message at a time, failing many times, never counted against its retries.
    for _ in range(10):
        before = len(rig.channel.published)
        rig.probe()
        assert len(rig.channel.published) == before + 1 and len(rig.channel.ids()) == 1
        rig.probe()  # a second one while the first is out: refused
        assert len(rig.channel.published) == before + 1
        rig.channel.report_last(Outcome.RETRY, "ConnectionRefusedError")
    assert rig.lanes.returned == [] and rig.held == 50
    # The sink is back: the probe succeeds, the circuit closes, receiving resumes, all go out.
    rig.probe()
    before = len(rig.channel.published)
    rig.channel.report_last(Outcome.ACK)
    assert not rig.gate.is_open
    assert await asyncio.wait_for(reserving, 2.0) is True  # the loop runs: parked runs go out now
    assert len(rig.channel.published) == before + 49
    assert rig.lanes.returned == []


@on_loop
async def test_a_probe_given_up_is_parked_again_and_the_circuit_cannot_wedge() -> None:
    """A probe held past --max-processing-time was neither parked again nor counted: with nothing
    parked the circuit stayed open for good, the worker held nothing and never received again."""
    rig = make_rig(circuit_threshold=2, retries=5, max_processing_time=31)
    await rig.receive([raw_message(0), raw_message(1)])
    rig.channel.report_all(Outcome.RETRY, "TimeoutError")
    rig.fire_timers()  # the retry due before the circuit opened is parked when it comes
    assert rig.gate.is_open and len(rig.gate.parked) == 2
    rig.probe()
    probe = rig.ledger.get(rig.channel.published[-1][0][0].ack_id)
    assert probe is not None and probe.run.probe
    rig.clock.advance(40)
    rig.dispatcher.give_up_overdue(rig.clock(), 31)
    assert not probe.run.probe and probe.run in rig.gate.parked and rig.lanes.returned == []
    assert not rig.gate.circuit._probing and rig.gate.circuit._probes == 1
    rig.probe()  # the next probe goes out
    assert len(rig.channel.published) == 4
    # Everything goes (say the poller's operator purged it): nothing is left to probe with, and
    # a receive is let through to bring a probe rather than wait for ever.
    for held in list(rig.ledger):
        held.run.live = False
        rig.ledger.release(held.message.ack_id)
    rig.gate.parked.clear()
    rig.ledger.reserved = 0
    assert rig.gate.is_open
    assert await asyncio.wait_for(rig.receiver.reserve(10), 2.0) is True
    rig.polls.started(20)  # that receive is under way: no second one meanwhile
    second = _reserve_in_task(rig, 10)
    assert await _blocked(second)
    second.cancel()


@on_loop
async def test_after_a_round_of_failed_probes_one_receive_may_bring_new_messages() -> None:
    """Messages a sink refuses because of themselves, the last ones on a queue, look like a broken
    sink (the circuit opens on them): once each was probed and failed, one receive may bring a
    message that lets the sink show it works, so they never hold the queue up for good."""
    rig = make_rig(circuit_threshold=3, retries=5)
    await rig.receive([raw_message(i) for i in range(3)])
    rig.channel.report_all(Outcome.RETRY, "problem of the sink")
    rig.fire_timers()
    assert rig.gate.is_open and len(rig.gate.parked) == 3
    probed = []
    for _ in range(3):
        assert rig.gate.holds_receiving(False)
        rig.probe()
        probed.append(rig.channel.ids()[0])
        rig.channel.report_last(Outcome.RETRY, "problem of the sink")
    assert sorted(probed) == ["id-0", "id-1", "id-2"]  # in turn, not the same one again
    rig.probe()
    rig.channel.report_last(Outcome.RETRY, "problem of the sink")
    assert not rig.gate.holds_receiving(False)
    assert await asyncio.wait_for(rig.receiver.reserve(10), 2.0) is True
    rig.receiver.take([raw_message(9)])  # parked at once, the counting starts again
    assert rig.gate.holds_receiving(False)


@on_loop
async def test_a_successful_probe_is_no_longer_the_probe() -> None:
    """After its probe succeeded, a FIFO run's later failure must not end another probe that is out."""
    rig = make_rig(circuit_threshold=1, keeps_order=False)
    await rig.receive([raw_message(0, group="a"), raw_message(1, group="a"), raw_message(2, group="b")])
    rig.channel.report_all(Outcome.RETRY, "503")
    assert rig.gate.is_open
    rig.probe()
    assert rig.channel.ids() == ["id-0"]
    rig.channel.report_last(Outcome.ACK)  # the probe: the circuit closes, id-1 goes out
    assert not rig.gate.is_open
    run_a = rig.ledger.get("rh-1").run  # type: ignore[union-attr]
    assert rig.channel.ids() == ["id-1"] and not run_a.probe


@on_loop
async def test_no_probe_timer_spins_while_a_probe_is_out() -> None:
    """The probe timer was re-armed at once while a probe was out (its time had come, and the
    circuit refuses a second probe until the first ends): a busy loop for the whole attempt."""
    rig = make_rig(circuit_threshold=3, retries=5)
    await rig.receive([raw_message(i) for i in range(3)])
    rig.channel.report_all(Outcome.RETRY, "503")
    rig.fire_timers()
    assert rig.gate.is_open and len(rig.gate.parked) == 3
    rig.probe()
    assert len(rig.gate.parked) == 2  # one out, two still parked
    # A spinning timer is a new handle at every turn of the loop (kept here, so none is mistaken
    # for another); the compiled gate's next_probe cannot be wrapped to count its calls.
    armed: list[asyncio.TimerHandle] = []
    for _ in range(50):
        timer = rig.dispatcher._probe_timer
        if timer is not None and not any(timer is seen for seen in armed):
            armed.append(timer)
        await asyncio.sleep(0)
    assert len(armed) <= 1, f"the probe timer was armed {len(armed)} times while the probe was out"
    # The probe fails: the next one is timed for after the circuit's backoff.
    rig.channel.report_last(Outcome.RETRY, "503")
    assert rig.dispatcher._probe_timer is not None
    assert rig.gate.circuit.next_probe_at > rig.clock()


@on_loop
async def test_retry_after_is_honoured_up_to_a_cap_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    from poller.dispatcher import RETRY_AFTER_CAP

    rig = make_rig()
    await rig.receive([raw_message(1)])
    rig.channel.report_last(Outcome.RETRY, "429", 3600.0)
    [delay] = rig.delay_of_timers()
    assert RETRY_AFTER_CAP - 1 < delay <= RETRY_AFTER_CAP
    assert "3600 s" in caplog.text and "Retry-After" in caplog.text


class SheddingChannel(FakeChannel):
    """Holds the first ``limit`` messages "on the wire"; the rest wait until ``shed``."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.shed_calls = 0

    def shed(self) -> None:
        self.shed_calls += 1
        waiting = [(m, r) for batch, r in self.published for m in batch][self.limit:]
        for message, report in waiting:
            report(message, Outcome.RETRY, "held back")


@on_loop
async def test_when_the_circuit_opens_what_the_channel_has_not_sent_is_shed_and_parked() -> None:
    channel = SheddingChannel(limit=5)
    rig = make_rig(circuit_threshold=5, retries=1, max_in_flight=100, channel=channel)
    await rig.receive([raw_message(i) for i in range(30)])
    on_wire = [m for batch, _ in channel.published for m in batch][:5]
    for message in on_wire:  # what was sent fails: the circuit opens
        channel.published[0][1](message, Outcome.RETRY, "TimeoutError")
    assert rig.gate.is_open
    await asyncio.sleep(0)  # the shed is called once this verdict is done
    assert channel.shed_calls == 1
    # Parked: the 25 shed and the failure that opened the circuit; the 4 before it wait for
    # their in-place retry (parked when it comes). Nothing was sent again, nothing returned.
    assert len(rig.gate.parked) == 26 and rig.held == 30
    assert len(channel.published) == 30 and rig.lanes.returned == []  # one publish per message


@on_loop
async def test_successes_in_between_keep_the_circuit_closed() -> None:
    rig = make_rig(circuit_threshold=3)
    await rig.receive([raw_message(i) for i in range(10)])
    for i, (messages, report) in enumerate(list(rig.channel.published)):
        report(messages[0], Outcome.RETRY if i % 3 != 2 else Outcome.ACK, "503")
    assert not rig.gate.is_open


# -- reports from anywhere -----------------------------------------------------------------------


@pytest.mark.parametrize(("first", "second"), [
    (Outcome.ACK, Outcome.ACK), (Outcome.RETRY, Outcome.ACK), (Outcome.ACK, Outcome.RETRY),
    (Outcome.REJECT, Outcome.ACK), (Outcome.RETRY, Outcome.REJECT),
])
@on_loop
async def test_double_report_is_ignored(first: Outcome, second: Outcome) -> None:
    rig = make_rig()
    await rig.receive([raw_message(1), raw_message(2)])
    message, report = rig.channel.published[0][0][0], rig.channel.published[0][1]
    report(message, first, "first")
    before = (list(rig.deletes.items), list(rig.lanes.returned), rig.counters.snapshot(), rig.held)
    report(message, second, "second")
    assert (rig.deletes.items, rig.lanes.returned, rig.counters.snapshot(), rig.held) == before


@on_loop
async def test_report_of_a_message_not_in_the_run_is_ignored() -> None:
    rig = make_rig()
    await rig.receive([raw_message(1)])
    stranger = Message(id="x", body="", ack_id="not-held")
    rig.channel.published[0][1](stranger, Outcome.ACK, "")
    assert rig.deletes.items == [] and rig.held == 1


@on_loop
async def test_a_report_from_another_thread_restarts_the_worker() -> None:
    """The channel contract: reports are made on the loop (a channel of threads brings them
    over itself). One from another thread is a broken channel, not a verdict to decide."""
    rig = make_rig()
    await rig.receive([raw_message(1)])
    thread = threading.Thread(target=rig.channel.report_last, args=(Outcome.ACK,))
    thread.start()
    await asyncio.to_thread(thread.join, 5)
    for _ in range(100):
        if rig.failures:
            break
        await asyncio.sleep(0.01)
    assert rig.failures and "not the event loop's" in rig.failures[0]
    assert rig.deletes.items == [] and rig.held == 1  # not decided: redelivered after the restart


@on_loop
async def test_a_report_from_within_publish_is_decided_after_publish_returned() -> None:
    class RejectingAtOnce(FakeChannel):
        def publish(self, batch: Sequence[Message], report: Report) -> None:
            super().publish(batch, report)
            report(batch[0], Outcome.REJECT, "cannot make a CloudEvent")
            assert rig.counters.get("rejected") == 0  # not decided inside publish

    rig = make_rig(channel=RejectingAtOnce())
    await rig.receive([raw_message(1)])
    await asyncio.sleep(0)
    assert rig.counters.get("rejected") == 1 and rig.held == 0


# -- in-flight bound ----------------------------------------------------------------------------


@on_loop
async def test_reserve_blocks_at_max_in_flight_until_deletes_return() -> None:
    rig = make_rig(batch_size=5, max_in_flight=10)
    await rig.receive([raw_message(i) for i in range(5)])
    await rig.receive([raw_message(i) for i in range(5, 10)])
    reserving = _reserve_in_task(rig, 5)
    assert await _blocked(reserving), "receiving went on above max_in_flight"
    rig.channel.report_all(Outcome.ACK)
    assert await _blocked(reserving), "acked but undeleted messages must count"
    rig.acker.deleted(rig.deletes.items[:5])
    assert await asyncio.wait_for(reserving, 2.0) is True


@on_loop
async def test_reserve_returns_false_when_stopping() -> None:
    rig = make_rig(batch_size=10, max_in_flight=10)
    await rig.receive([raw_message(i) for i in range(10)])
    reserving = _reserve_in_task(rig, 10)
    assert await _blocked(reserving)
    rig.stop()
    assert await asyncio.wait_for(reserving, 2.0) is False
    assert rig.ledger.reserved == 10  # nothing reserved by the refused call
    assert await rig.receiver.reserve(1) is False  # and no more once stopping


@on_loop
async def test_partial_receive_gives_back_its_reservation() -> None:
    rig = make_rig(batch_size=10, max_in_flight=20)
    await rig.receive([raw_message(i) for i in range(3)])
    await rig.receive([])
    assert rig.ledger.reserved == 3
    assert await rig.receiver.reserve(10) and await rig.receiver.reserve(7)
    assert rig.ledger.reserved == 20


@on_loop
async def test_return_of_a_message_received_very_often_is_capped() -> None:
    rig = make_rig(retries=0, nack_backoff=2.0, nack_backoff_max=300.0)
    await rig.receive([raw_message(1, receive_count=5000)])
    rig.channel.report_last(Outcome.RETRY, "sink down for days")
    assert rig.lanes.returned and rig.lanes.returned[0][1] <= 360


# -- extension ----------------------------------------------------------------------------------


@on_loop
async def test_extension_covers_delivering_waiting_and_deleting_messages() -> None:
    rig = make_rig(visibility_timeout=10)
    await rig.receive([raw_message(i) for i in range(3)])
    published = rig.channel.published
    published[0][1](published[0][0][0], Outcome.ACK, "")  # deleting
    published[1][1](published[1][0][0], Outcome.RETRY, "503")  # waiting for a retry
    now = rig.clock()
    ledger = rig.ledger
    assert ledger.due_for_extension(now, 5, 10) == ([], [])  # not yet
    due, at_limit = ledger.due_for_extension(now + 6, 5, 10)
    assert sorted(h.message.ack_id for h in due) == ["rh-0", "rh-1", "rh-2"] and at_limit == []
    assert ledger.due_for_extension(now + 6, 5, 10) == ([], [])  # marked as extended


@on_loop
async def test_a_message_held_for_sqs_12_hours_is_given_back_not_extended(caplog: pytest.LogCaptureFixture) -> None:
    """SQS refuses any visibility past 12 hours from the receive: such a message is given back
    once, with a log line, instead of failing an extension on every tick for ever."""
    rig = make_rig(visibility_timeout=600)
    await rig.receive([raw_message(0), raw_message(1, group="g"), raw_message(2, group="g")])
    ledger = rig.ledger
    later = rig.clock() + 43_200 - 600
    for held in ledger:
        held.visible_until = later  # extended until then, each time on time
    due, at_limit = ledger.due_for_extension(later, 300, 600)
    assert due == [] and sorted(h.message.ack_id for h in at_limit) == ["rh-0", "rh-1", "rh-2"]
    rig.dispatcher.give_back_at_limit(at_limit)
    assert rig.held == 0 and sorted(rig.lanes.returned) == [("rh-0", 0), ("rh-1", 0), ("rh-2", 0)]
    [group_call] = [call for call in rig.lanes.return_calls if "g" in call[1]]
    assert group_call[0] == ["rh-1", "rh-2"]  # the group in one call, head first
    assert "12 hours" in caplog.text
    rig.channel.report_all(Outcome.ACK)  # the attempts still out answer at last: ignored
    assert rig.deletes.items == []


@on_loop
async def test_receives_refused_for_good_fail_the_health_check_after_a_minute() -> None:
    """AccessDenied (a permission taken away) or a deleted queue: retrying for ever with /healthz
    at 200 hides it; after a minute the worker's health check fails (no heartbeat), the worker is
    replaced, and the new one's start check says why in one line."""
    from poller.sqs import SqsError

    rig = make_rig()
    task = asyncio.get_running_loop().create_task(rig.receiver.run(0))
    await rig.sqs.answers.put(SqsError("AccessDenied", "ReceiveMessage: not authorized", retryable=False))
    for _ in range(100):
        await asyncio.sleep(0)
    assert rig.counters.get("receive_errors") == 1
    assert rig.receiver.refused() == ""  # refused only just now: still healthy
    rig.clock.advance(61)
    assert "AccessDenied" in rig.receiver.refused()
    rig.stop()
    await asyncio.wait_for(task, 5)


@on_loop
async def test_a_receive_that_works_again_clears_the_refusal() -> None:
    from poller.sqs import SqsError

    rig = make_rig()
    task = asyncio.get_running_loop().create_task(rig.receiver.run(0))
    await rig.sqs.answers.put(SqsError("AccessDenied", "ReceiveMessage: not authorized", retryable=False))
    await rig.sqs.answers.put([raw_message(1)])
    for _ in range(200):
        if rig.channel.published:
            break
        await asyncio.sleep(0.01)
    rig.clock.advance(61)
    assert rig.receiver.refused() == "" and rig.channel.ids() == ["id-1"]
    task.cancel()


@on_loop
async def test_a_bug_in_receiving_escapes_for_the_worker_to_restart() -> None:
    """Only SQS's errors are retried: anything else is a bug, and retrying it would log the
    same warning for ever without its traceback."""
    rig = make_rig()
    task = asyncio.get_running_loop().create_task(rig.receiver.run(0))
    await rig.sqs.answers.put(ZeroDivisionError("a bug"))
    with pytest.raises(ZeroDivisionError):
        await asyncio.wait_for(task, 5)
    assert rig.ledger.reserved == 0


@on_loop
async def test_a_receiver_waiting_out_its_backoff_is_not_a_poll_in_flight() -> None:
    """A receiver sleeping after a failed receive counted as a long poll in flight: while the
    circuit was open that held back the one receive a parked run may need."""
    from poller.sqs import SqsError

    rig = make_rig()
    task = asyncio.get_running_loop().create_task(rig.receiver.run(0))
    await rig.sqs.answers.put(SqsError("ServiceUnavailable", "ReceiveMessage: try later", retryable=True))
    for _ in range(100):
        if rig.counters.get("receive_errors"):
            break
        await asyncio.sleep(0.005)
    assert rig.counters.get("receive_errors") == 1
    assert rig.polls.in_flight == 0 and rig.ledger.reserved == 0
    rig.stop()
    await asyncio.wait_for(task, 5)


@on_loop
async def test_a_receiver_beyond_the_window_waits_until_the_window_opens() -> None:
    """The worker runs --max-receivers receivers; those beyond the window (poller.window) do not
    poll until it lets them, and a stop ends them too."""
    rig = make_rig(receivers=1, max_receivers=2)
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(rig.receiver.run(i)) for i in range(2)]
    await asyncio.sleep(0.05)
    assert rig.polls.in_flight == 1 and rig.ledger.reserved == 10
    rig.receiver.window.limit = 2
    for _ in range(200):
        if rig.polls.in_flight == 2:
            break
        await asyncio.sleep(0.01)
    assert rig.polls.in_flight == 2 and rig.ledger.reserved == 20
    rig.receiver.window.limit = 1  # the window closes: the receive under way ends as it would
    await rig.sqs.answers.put([])  # receiver 0's: it polls again, behind receiver 1
    await asyncio.sleep(0.01)
    await rig.sqs.answers.put([])  # receiver 1's: it waits
    await asyncio.sleep(0.05)
    assert rig.polls.in_flight == 1 and rig.ledger.reserved == 10
    rig.stop()
    await rig.sqs.answers.put([])
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert rig.ledger.reserved == 0


# -- room below --max-in-flight -------------------------------------------------------------------


async def _waiting(room: Room, count: int) -> list[asyncio.Task[None]]:
    tasks = [asyncio.create_task(room.wait()) for _ in range(count)]
    await asyncio.sleep(0)  # each is waiting now
    return tasks


@on_loop
async def test_room_for_one_batch_wakes_one_waiter_the_first() -> None:
    ledger = Ledger(30)
    ledger.reserve(30)
    room = Room(ledger, 10, asyncio.get_running_loop(), recheck=60)
    first, second, third = await _waiting(room, 3)
    ledger.unreserve(10)
    room.changed()
    await asyncio.sleep(0)
    assert first.done() and not second.done() and not third.done()
    ledger.unreserve(20)  # room for every batch: the other two
    room.changed()
    await asyncio.sleep(0)
    assert second.done() and third.done()


@on_loop
async def test_no_room_wakes_no_waiter_and_wake_wakes_them_all() -> None:
    ledger = Ledger(30)
    ledger.reserve(25)
    room = Room(ledger, 10, asyncio.get_running_loop(), recheck=60)
    tasks = await _waiting(room, 2)
    room.changed()
    await asyncio.sleep(0)
    assert not any(t.done() for t in tasks)
    room.wake()  # the circuit closed, or a stop
    await asyncio.sleep(0)
    assert all(t.done() for t in tasks)


@on_loop
async def test_a_waiter_that_timed_out_or_was_cancelled_does_not_take_a_wake_up() -> None:
    ledger = Ledger(30)
    ledger.reserve(30)
    room = Room(ledger, 10, asyncio.get_running_loop(), recheck=0.02)
    (expired,) = await _waiting(room, 1)
    await asyncio.sleep(0.05)
    assert expired.done()  # its recheck came: it looks again on its own
    (cancelled,) = await _waiting(room, 1)
    cancelled.cancel()
    await asyncio.sleep(0)
    room._recheck = 60  # the next ones wait for a wake-up only
    (waiter,) = await _waiting(room, 1)
    ledger.unreserve(10)
    room.changed()
    await asyncio.sleep(0)
    assert waiter.done()


@on_loop
async def test_a_waiter_woken_then_cancelled_passes_the_room_on() -> None:
    ledger = Ledger(30)
    ledger.reserve(30)
    room = Room(ledger, 10, asyncio.get_running_loop(), recheck=60)
    woken, other = await _waiting(room, 2)
    ledger.unreserve(10)
    room.changed()  # the first is woken: its future is done, its task has not run yet
    woken.cancel()  # a stop, before it took the room
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert woken.cancelled() and other.done() and not other.cancelled()
