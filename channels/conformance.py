"""A conformance kit any channel can run against its real sink: what ``channels.base`` promises
the worker, checked from outside.

- every message given to ``publish`` is reported exactly once, with ``Outcome.ACK``, ``RETRY``
  or ``REJECT`` (a reason that is a string, a ``retry_after`` that is a number >= 0), for every
  message of every batch, on the event loop's thread (``channels.reports`` brings a thread's
  reports there), and nothing is reported after ``aclose`` returned;
- an ACK means the sink has the message (``Target.received`` lists it);
- ``aclose`` reports what is still in flight as RETRY (never silence, never REJECT) and returns
  within its timeout (and a little);
- a channel that ``keeps_order`` delivers the messages of one ``publish`` in that order.

It lives in ``channels/`` (installed with the poller) so a channel of another distribution runs
it from its own tests; it needs no test framework: a failed check raises ``ConformanceError``
(an ``AssertionError``). With pytest::

    @pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
    def test_conformance(check, my_sink):
        run_check(check, Target(config=MyConfig(...), received=my_sink.ids, stall=my_sink.stalled))
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from channels.base import Channel, ChannelConfig, Message, Outcome

__all__ = ["CHECKS", "ConformanceError", "Target", "every_message_reported_once", "order_kept_within_a_publish",
           "retry_for_what_is_in_flight_at_close", "run_all", "run_check"]


class ConformanceError(AssertionError):
    """A channel broke a promise of ``channels.base``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """A channel to check and its real sink.

    ``received()``: the CloudEvent ids (= message ids) the sink holds so far, in arrival order;
    called from a thread, it may block (a Kafka consumer reading the topic). ``stall()``: a
    context manager inside which the sink takes connections and answers nothing (a paused
    broker, a server that holds its answers); without one, the close check closes at once after
    publishing instead, which leaves less in flight.
    """

    config: ChannelConfig
    received: Callable[[], Sequence[str]]
    stall: Callable[[], AbstractContextManager[Any]] | None = None
    source: str = "urn:sqs-poller:conformance"
    timeout: float = 30.0  # for the sink to get and answer everything; and the close check's bound
    close_timeout: float = 1.0  # given to aclose while the sink is stalled


Check = Callable[[Target], Coroutine[Any, Any, None]]


@dataclass(slots=True)
class _Reports:
    """Every report call, checked as it comes (made on the loop it was created on)."""

    published: dict[int, Message] = field(default_factory=dict)  # id(message) -> message
    outcomes: dict[str, list[Outcome]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    loop_thread: int = field(default_factory=threading.get_ident)

    def report(self, message: Message, outcome: Any, reason: Any = "", retry_after: Any = 0.0) -> None:
        with self.lock:
            if id(message) not in self.published:
                self.errors.append(f"a report for a message that was never published: {message!r}")
                return
            if threading.get_ident() != self.loop_thread:
                self.errors.append(f"message {message.id}: reported on thread {threading.current_thread().name}, "
                                   "not the event loop's")
            if not isinstance(outcome, Outcome):
                self.errors.append(f"message {message.id}: outcome {outcome!r} is not an Outcome")
            if not isinstance(reason, str):
                self.errors.append(f"message {message.id}: reason {reason!r} is not a string")
            if not isinstance(retry_after, (int, float)) or retry_after < 0:
                self.errors.append(f"message {message.id}: retry_after {retry_after!r} is not a number >= 0")
            self.outcomes.setdefault(message.id, []).append(outcome)

    def add(self, batch: Sequence[Message]) -> None:
        with self.lock:
            self.published.update((id(m), m) for m in batch)

    def reported(self) -> int:
        with self.lock:
            return len(self.outcomes)

    def snapshot(self) -> dict[str, list[Outcome]]:
        with self.lock:
            if self.errors:
                raise ConformanceError("; ".join(self.errors[:5]))
            return {k: list(v) for k, v in self.outcomes.items()}


def messages(count: int, group: str | None = None) -> list[Message]:
    """Fresh messages as the worker hands them over: unique ids, a JSON body, SQS attributes."""
    now = str(int(time.time() * 1000))
    made = []
    for n in range(count):
        attributes = {"SentTimestamp": now, "ApproximateReceiveCount": "1"}
        if group is not None:
            attributes["MessageGroupId"] = group
        made.append(Message(id=str(uuid.uuid4()), body=f'{{"n": {n}}}', ack_id=f"ack-{n}", attributes=attributes))
    return made


async def _start(target: Target) -> tuple[Channel, _Reports]:
    channel = target.config.create(target.source)
    await asyncio.to_thread(channel.start)  # as the worker does: start may block
    return channel, _Reports()


def _publish(channel: Channel, reports: _Reports, batch: Sequence[Message]) -> None:
    reports.add(batch)
    channel.publish(batch, reports.report)


async def _until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def _exactly_once(reports: _Reports, sent: Sequence[Message], when: str) -> dict[str, Outcome]:
    seen = reports.snapshot()
    missing = [m.id for m in sent if m.id not in seen]
    if missing:
        raise ConformanceError(f"{len(missing)} of {len(sent)} messages were never reported {when} "
                               f"(e.g. {missing[0]})")
    twice = {k: v for k, v in seen.items() if len(v) > 1}
    if twice:
        some = next(iter(twice.items()))
        raise ConformanceError(f"{len(twice)} messages were reported more than once (e.g. {some[0]}: {some[1]})")
    return {k: v[0] for k, v in seen.items()}


async def _acked_are_received(target: Target, outcomes: dict[str, Outcome]) -> None:
    acked = {k for k, v in outcomes.items() if v is Outcome.ACK}
    deadline = time.monotonic() + target.timeout
    while True:
        absent = acked - set(await asyncio.to_thread(target.received))
        if not absent:
            return
        if time.monotonic() > deadline:
            raise ConformanceError(f"{len(absent)} messages were acked but the sink does not have them "
                                   f"(e.g. {next(iter(absent))})")
        await asyncio.sleep(0.2)


async def _nothing_after_close(reports: _Reports, count: int) -> None:
    await asyncio.sleep(0.3)  # a report that comes after aclose returned would be lost on the worker
    if reports.reported() != count:
        raise ConformanceError("a message was reported after aclose returned")


# -- the checks ---------------------------------------------------------------------------------


async def every_message_reported_once(target: Target) -> None:
    """Batches of 1, 7 and 10 to a working sink: each message reported once, ACK, on the sink."""
    channel, reports = await _start(target)
    sent: list[Message] = []
    try:
        for size in (1, 7, 10):
            batch = messages(size)
            sent += batch
            _publish(channel, reports, batch)
        await _until(lambda: reports.reported() >= len(sent), target.timeout)
    finally:
        await channel.aclose(timeout=target.timeout)
    outcomes = _exactly_once(reports, sent, "by a working sink")
    not_acked = {k: v for k, v in outcomes.items() if v is not Outcome.ACK}
    if not_acked:
        raise ConformanceError(f"a working sink did not get {len(not_acked)} good messages: "
                               f"{sorted({v.name for v in not_acked.values()})}")
    await _nothing_after_close(reports, len(sent))
    await _acked_are_received(target, outcomes)


async def retry_for_what_is_in_flight_at_close(target: Target) -> None:
    """Publish to a stalled sink, then aclose: every message reported by the time aclose
    returns, and none REJECT; with a stall, all RETRY."""
    channel, reports = await _start(target)
    sent = messages(12)
    stall = target.stall() if target.stall is not None else nullcontext()
    with stall:
        closing_at = 0.0
        try:
            _publish(channel, reports, sent)
            if target.stall is not None:
                await asyncio.sleep(0.3)  # let the requests reach the stalled sink
        finally:
            closing_at = time.monotonic()
            await channel.aclose(timeout=target.close_timeout if target.stall is not None else 0.0)
        took = time.monotonic() - closing_at
        outcomes = _exactly_once(reports, sent, "when aclose returned")
    if took > target.close_timeout + 5.0:
        raise ConformanceError(f"aclose(timeout={target.close_timeout:g}) took {took:.1f} s")
    rejected = [k for k, v in outcomes.items() if v is Outcome.REJECT]
    if rejected:
        raise ConformanceError(f"{len(rejected)} good messages in flight at close were rejected, not retried")
    if target.stall is not None:
        acked = [k for k, v in outcomes.items() if v is Outcome.ACK]
        if acked:
            raise ConformanceError(f"{len(acked)} messages were acked while the sink answered nothing")
    await _nothing_after_close(reports, len(sent))
    await _acked_are_received(target, outcomes)


async def order_kept_within_a_publish(target: Target) -> None:
    """A channel that ``keeps_order``: one publish of 20 messages of one group reaches the sink in
    that order. Passes at once for a channel that does not claim it (the worker then hands a
    group's messages over one at a time)."""
    channel, reports = await _start(target)
    if not channel.keeps_order:
        await channel.aclose(timeout=target.timeout)
        return
    sent = messages(20, group="conformance")
    try:
        _publish(channel, reports, sent)
        await _until(lambda: reports.reported() >= len(sent), target.timeout)
    finally:
        await channel.aclose(timeout=target.timeout)
    outcomes = _exactly_once(reports, sent, "by a working sink")
    if any(v is not Outcome.ACK for v in outcomes.values()):
        raise ConformanceError("a working sink did not get every message of the group")
    await _acked_are_received(target, outcomes)
    wanted = {m.id for m in sent}
    arrived: list[str] = []
    for event_id in await asyncio.to_thread(target.received):
        if event_id in wanted and event_id not in arrived:
            arrived.append(event_id)
    if arrived != [m.id for m in sent]:
        first = next(i for i, (a, b) in enumerate(zip(arrived, sent, strict=False)) if a != b.id)
        raise ConformanceError(f"keeps_order, but message {first} of the publish arrived out of order")


CHECKS: tuple[Check, ...] = (every_message_reported_once, retry_for_what_is_in_flight_at_close,
                             order_kept_within_a_publish)


def run_check(check: Check, target: Target) -> None:
    """Run one check on an event loop of its own, as the worker runs the channel."""
    asyncio.run(check(target))


def run_all(target: Target) -> None:
    for check in CHECKS:
        run_check(check, target)
