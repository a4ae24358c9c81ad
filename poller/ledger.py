"""What a worker holds: each message from its receipt until SQS no longer needs anything from us.

A message stays in the ledger while the channel delivers it, while it waits for a retry or for
the circuit to close, and after its ack until its ``DeleteMessageBatch`` has returned. All that
time it counts against ``--max-in-flight`` (so slow deletes slow receiving instead of growing
memory) and its visibility is extended. It leaves when it is deleted, returned to SQS, or
rejected (left to the redrive policy).

A ``Run`` is what is delivered and settled together, in order: one message on a standard queue,
the messages of one FIFO group from one receive on a FIFO queue.

Not thread-safe: it lives on the worker's event loop.
"""

from __future__ import annotations

import asyncio
import enum
import math
from collections.abc import Iterator, Sequence

from channels.base import Message, Outcome

__all__ = ["VISIBILITY_LIMIT", "Held", "Ledger", "Room", "Run", "Stage"]

# SQS: a message's visibility cannot be extended past 12 hours from its receipt
# (https://docs.aws.amazon.com/AWSSimpleQueueService/latest/SQSDeveloperGuide/sqs-visibility-timeout.html).
VISIBILITY_LIMIT = 43_200
# Our receipt time is a little after SQS's (the answer's way back): stop this much short of it.
_LIMIT_MARGIN = 60.0


class Stage(enum.Enum):
    DELIVERING = "delivering"  # handed to the channel, verdict pending
    WAITING = "waiting"  # failed: waiting for an in-place retry or for the circuit to close
    DELETING = "deleting"  # acked: DeleteMessageBatch pending


# Plain classes, not dataclasses: compiled (setup.py), a dataclass keeps the __init__ that
# dataclasses generates, interpreted: Held was made in ~0.9 us, ~0.35 us as written here.
class Held:
    __slots__ = ("attempt_started", "message", "outcome", "reason", "received_at", "retry_after", "run",
                 "stage", "visible_until")

    def __init__(self, message: Message, run: Run, visible_until: float, received_at: float = 0.0) -> None:
        self.message = message
        self.run = run
        self.visible_until = visible_until  # when SQS would hand the message out again (the worker's clock)
        self.received_at = received_at  # when the receive that brought it returned
        self.stage = Stage.DELIVERING
        self.attempt_started = 0.0
        self.outcome: Outcome | None = None
        self.reason = ""
        self.retry_after = 0.0  # seconds the sink asked to wait (Retry-After)


class Run:
    __slots__ = ("attempt", "entries", "failures", "live", "paced", "probe", "unreported", "window")

    def __init__(self) -> None:
        self.entries: list[Held] = []
        self.attempt = 0  # bumped on each publish; a report for an older attempt is stale
        self.window = 0  # how many entries, from the first, the current attempt handed over
        self.unreported = 0
        self.failures = 0  # failed attempts while the circuit was closed
        self.probe = False
        self.paced = False  # scheduled for its turn under --max-rate (not a retry)
        self.live = True  # False once settled for good or given back


class Ledger:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.reserved = 0  # held + room reserved for receives under way
        self._held: dict[str, Held] = {}

    def __len__(self) -> int:
        return len(self._held)

    def __iter__(self) -> Iterator[Held]:
        return iter(self._held.values())

    def fits(self, n: int) -> bool:
        return self.reserved + n <= self.limit

    def reserve(self, n: int) -> None:
        self.reserved += n

    def unreserve(self, n: int) -> None:
        self.reserved -= n

    def add(self, held: Held) -> bool:
        """Hold a received message (its room was reserved). False if its receipt handle is held
        already (SQS never does that; the room is given back)."""
        handle = held.message.ack_id
        if handle in self._held:
            self.reserved -= 1
            return False
        self._held[handle] = held
        return True

    def get(self, handle: str) -> Held | None:
        return self._held.get(handle)

    def release(self, handle: str) -> Held | None:
        held = self._held.pop(handle, None)
        if held is not None:
            self.reserved -= 1
        return held

    def due_for_extension(self, now: float, margin: float, timeout: float) -> tuple[list[Held], list[Held]]:
        """Messages whose visibility ends within ``margin``: those that may be extended by
        ``timeout`` (marked as extended to ``now + timeout``; a failed extension calls
        ``extension_failed`` to be tried again), and those that may not, because SQS refuses
        any visibility past ``VISIBILITY_LIMIT`` seconds from the receipt."""
        due, at_limit = [], []
        limit = VISIBILITY_LIMIT - _LIMIT_MARGIN - timeout  # held longer than this: no extension fits
        for held in self._held.values():
            if held.visible_until - now < margin:
                if now - held.received_at > limit:
                    at_limit.append(held)
                    continue
                held.visible_until = now + timeout
                due.append(held)
        return due, at_limit

    def still_held(self, handles: Sequence[str]) -> set[str]:
        return {handle for handle in handles if handle in self._held}

    def extension_failed(self, handles: Sequence[str]) -> None:
        """Due again at the next extension tick."""
        for handle in handles:
            held = self._held.get(handle)
            if held is not None:
                held.visible_until = -math.inf

    def visibility_lost(self, handles: Sequence[str]) -> None:
        """Visible again already: extending these further is pointless."""
        for handle in handles:
            held = self._held.get(handle)
            if held is not None:
                held.visible_until = math.inf

    def overdue_runs(self, now: float, limit: float) -> list[Run]:
        """Runs one delivery attempt has held longer than ``limit`` seconds."""
        runs: dict[int, Run] = {}
        for held in self._held.values():
            if held.stage is Stage.DELIVERING and now - held.attempt_started > limit:
                runs[id(held.run)] = held.run
        return list(runs.values())


class Room:
    """Receivers waiting for room below ``--max-in-flight`` (or for the circuit to close): each
    waits with a timeout and checks again; ``changed`` wakes as many as batches fit now.

    Not all of them: while the cap binds (a slow sink, slow deletes), room comes back a delete
    batch at a time, and waking every receiver for one batch's room had each of the others wake,
    find none and wait again (a new future and timer) for nothing, once per delete batch."""

    def __init__(self, ledger: Ledger, batch: int, loop: asyncio.AbstractEventLoop, *,
                 recheck: float = 0.5) -> None:
        self._ledger = ledger
        self._batch = batch
        self._loop = loop
        self._recheck = recheck  # a waiter looks again this often, woken or not
        self._waiters: list[asyncio.Future[None]] = []  # in the order they came

    async def wait(self) -> None:
        future: asyncio.Future[None] = self._loop.create_future()
        self._waiters.append(future)
        timer = self._loop.call_later(self._recheck, self._expire, future)
        try:
            await future
        except asyncio.CancelledError:
            if future.cancelled():  # its task was cancelled while it waited: no longer waiting
                self._drop(future)
            else:  # woken, then cancelled before it ran: the room goes to the next waiter
                self.changed()
            raise
        finally:
            timer.cancel()

    def changed(self) -> None:
        """Messages were released: wake the first waiters, one per batch that fits now."""
        waiters = self._waiters
        woken = 0
        while waiters and self._ledger.fits(self._batch * (woken + 1)):
            future = waiters.pop(0)
            if not future.done():  # done: cancelled, its task not yet unwound; it takes no room
                future.set_result(None)
                woken += 1

    def wake(self) -> None:
        """Wake them all (the circuit closed, or a stop)."""
        waiters, self._waiters = self._waiters, []
        for future in waiters:
            _resolve(future)

    def _expire(self, future: asyncio.Future[None]) -> None:
        self._drop(future)
        _resolve(future)

    def _drop(self, future: asyncio.Future[None]) -> None:
        try:
            self._waiters.remove(future)
        except ValueError:
            pass  # woken already


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
