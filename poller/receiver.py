"""The receivers: long polls of ``ReceiveMessage``, each in its own task; ``--receivers`` of them,
more while a backlog waits and SQS's round trip calls for them (``poller.window``).

Each first reserves room for a whole batch below ``--max-in-flight`` (dramatiq's bounded
prefetch, Redpanda's ``max_outstanding_messages``), does not receive while the gate holds
receiving (the circuit is open), takes from the ``--max-messages`` budget, and hands what it got
to the dispatcher. A failed receive is retried with backoff; one SQS refuses for good (access
taken away, the queue gone) for long fails the health check, so that a new process re-runs the
start check and says why.

``Polls`` knows when every long poll started so far has ended: a stop gives messages back with a
visibility that lasts until then (``stop_visibility``).

Runs on the worker's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

from channels.base import Message
from poller.backoff import backoff
from poller.config import WorkerConfig
from poller.gate import Gate
from poller.ledger import Ledger, Room
from poller.logs import RateLimitedLog
from poller.sqs import SqsError
from poller.stats import Counters
from poller.watchdog import Watchdog
from poller.window import ReceiveWindow

__all__ = ["LOOP_LIMIT", "Budget", "Polls", "Receiver", "SharedCount"]

log = logging.getLogger(__name__)

LOOP_LIMIT = 60.0  # longest healthy gap between two beats of a loop, besides a long poll's wait
# --until-empty: after an empty receive, a receiver polls this long, so that once the queue is
# drained the poller stops within about this, not within a whole --wait-time.
_DRAINING_WAIT = 1
# ReceiveMessage refused for good (AccessDenied, the queue gone) this long: no more heartbeats.
REFUSED_FOR = 60.0
# A receiver beyond the window looks again this often (the window moves once a second).
_PARKED_RECHECK = 0.5


class SharedCount(Protocol):
    """A ``multiprocessing.Value('q')``: the messages the whole poller may still receive."""

    value: int

    def get_lock(self) -> AbstractContextManager[Any]: ...


class Budget:
    """``--max-messages``, shared by the workers: each receive takes what it asks for first."""

    def __init__(self, shared: SharedCount | None) -> None:
        self._shared = shared
        self.spent = False

    def take(self, n: int) -> int:
        """How many of ``n`` messages a receive may ask for."""
        if self._shared is None:
            return n
        with self._shared.get_lock():
            take = max(0, min(n, self._shared.value))
            self._shared.value -= take
        if take == 0:
            self.spent = True
        return take

    def give_back(self, n: int) -> None:
        if self._shared is not None and n > 0:
            with self._shared.get_lock():
                self._shared.value += n


class Polls:
    """The long polls of this process: how many are in flight and when they have all ended."""

    def __init__(self, wait_time: int, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.in_flight = 0
        self._ends_at = 0.0  # by when every long poll started so far has ended
        self._wait = wait_time  # the long-poll wait in use (--until-empty shortens it)
        self._stopped_at: float | None = None

    def started(self, wait_time: int) -> None:
        self.in_flight += 1
        self._wait = wait_time
        self._ends_at = max(self._ends_at, self._clock() + wait_time)

    def ended(self) -> None:
        self.in_flight -= 1

    def stopped(self) -> None:
        if self._stopped_at is None:
            self._stopped_at = self._clock()

    @property
    def ends_at(self) -> float:
        return self._ends_at

    def stop_visibility(self) -> int:
        """The visibility of what a stop gives back: 0 once no long poll can still be in flight,
        this process's or those of the processes the supervisor stopped with it (they end within
        a poll's wait of the stop); until then, long enough for them to have ended. Visible at
        once, SQS would hand a message to one stopping poll after another, a receive count each
        time (seen: 3-4 receives during one stop, healthy messages in a DLQ at maxReceiveCount 2)."""
        stopped_at = self._stopped_at if self._stopped_at is not None else self._clock()
        left = max(self._ends_at, stopped_at + self._wait) - self._clock()
        return math.ceil(left) + 1 if left > 0 else 0


class Client(Protocol):
    """What a receiver needs of ``poller.sqs.SqsClient``."""

    async def receive(self, *, max_messages: int, wait_time: int,
                      visibility_timeout: int | None = None) -> list[Message]: ...


class Receiver:
    def __init__(self, config: WorkerConfig, *, sqs: Client, ledger: Ledger, room: Room, gate: Gate,
                 polls: Polls, budget: Budget, hand_over: Callable[[Sequence[Message]], None],
                 counters: Counters, watchdog: Watchdog, clock: Callable[[], float]) -> None:
        self._config = config
        self.window = ReceiveWindow(config.receivers, config.receive_ceiling, config.batch_size, clock)
        self._sqs = sqs
        self._ledger = ledger
        self._room = room
        self._gate = gate
        self._polls = polls
        self._budget = budget
        self._hand_over = hand_over
        self._counters = counters
        self._watchdog = watchdog
        self._clock = clock
        self._stop = asyncio.Event()
        self._empty_receives = 0  # in a row, by any receiver (batch mode: --until-empty)
        self._refused: tuple[str, float] | None = None  # the last permanent error, since when
        self._receive_log = RateLimitedLog(log, "%d ReceiveMessage call(s) failed, retrying; last: %s")

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        """Receive no more: those waiting for room stop, those polling hand back what they get."""
        self._polls.stopped()
        self._stop.set()
        self._room.wake()

    async def run(self, index: int) -> None:
        """One receiver: until the stop, the --max-messages budget is spent, or it fails (an
        exception that is not SQS's escapes: a bug, for the worker to restart on)."""
        config = self._config
        name = f"receiver-{index}"
        # A long poll is bounded by its wait plus the client's deadline; backoff caps at 20 s.
        beat = self._watchdog.register(name, config.wait_time + LOOP_LIMIT)
        failures = 0
        wait_time = config.wait_time
        window = self.window
        try:
            while not self.stopping:
                if index >= window.limit:  # beyond what the backlog and the round trip call for
                    beat()
                    await self._sleep(_PARKED_RECHECK)
                    continue
                if not await self.reserve(config.batch_size, beat):
                    break
                beat()
                asked = self._budget.take(config.batch_size)
                if not asked:  # --max-messages reached: this receiver is done
                    self._ledger.unreserve(config.batch_size)
                    break
                self._polls.started(wait_time)
                started = self._clock()
                failed: SqsError | None = None
                try:
                    messages = await self._sqs.receive(max_messages=asked, wait_time=wait_time,
                                                       visibility_timeout=config.visibility_timeout)
                except SqsError as exc:  # credential errors come as SqsError too
                    failed = exc
                except BaseException:
                    self._ledger.unreserve(config.batch_size)
                    self._budget.give_back(asked)
                    raise
                finally:
                    self._polls.ended()
                if failed is not None:  # the backoff is not a poll in flight
                    self._ledger.unreserve(config.batch_size)
                    self._budget.give_back(asked)
                    if self.stopping:
                        break
                    failures += 1
                    if not failed.retryable and self._refused is None:
                        self._refused = (str(failed), self._clock())
                    self._counters.add("receive_errors")
                    self._receive_log.hit(str(failed))
                    await self._sleep(backoff(failures, base=0.5, cap=20.0))
                    continue
                took = self._clock() - started
                self._counters.observe("receive", took)
                window.received(len(messages), asked, took)
                failures = 0
                self._refused = None
                self._budget.give_back(asked - len(messages))
                self._empty_receives = 0 if messages else self._empty_receives + 1
                if config.until_empty:  # drained soon: a stop must not wait a whole long poll
                    wait_time = config.wait_time if messages else min(config.wait_time, _DRAINING_WAIT)
                beat()
                self.take(messages)
        finally:
            self._watchdog.unregister(name)

    def take(self, messages: Sequence[Message]) -> None:
        """A receive's answer: the room reserved for a whole batch and not used goes back, the
        messages to the dispatcher."""
        self._ledger.unreserve(self._config.batch_size - len(messages))
        if messages:
            self._hand_over(messages)
        else:
            self._room.changed()

    async def reserve(self, n: int, beat: Callable[[], None] = lambda: None) -> bool:
        """Wait until ``n`` more messages fit below ``max_in_flight`` and the gate lets receives
        through; False when stopping."""
        ledger = self._ledger
        while not ledger.fits(n) or self._gate.holds_receiving(self._polls.in_flight > 0):
            if self.stopping:
                return False
            await self._room.wait()
            beat()
        if self.stopping:
            return False
        ledger.reserve(n)
        return True

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake up for a stop."""
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except TimeoutError:
            pass

    # -- what the health check asks -------------------------------------------------------

    def refused(self) -> str:
        """Why receiving is refused for good, once it has been for ``REFUSED_FOR`` seconds."""
        if self._refused is None:
            return ""
        why, since = self._refused
        held_for = self._clock() - since
        return f"ReceiveMessage refused for {held_for:.0f}s: {why}" if held_for > REFUSED_FOR else ""

    def drained(self) -> bool:
        """Batch mode: nothing held, nothing being received, and either the --max-messages
        budget is spent or every receiver's last receive came back empty."""
        if len(self._ledger):
            return False
        if self._budget.spent:
            return not self._polls.in_flight  # what the last receives bring must be delivered first
        return self._config.until_empty and self._empty_receives >= self._config.receivers
