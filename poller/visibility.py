"""``ChangeMessageVisibilityBatch`` for the worker: extensions of held messages and returns.

Changes are sent in batches of up to 10 from a few lanes, so extension keeps up with any
``--max-in-flight``. A message always goes through the same lane (picked by its FIFO message
group, else by its receipt handle) and a lane has one call in flight at a time, in the order
changes were asked for, so a return is never overtaken by an extension asked for before it. An
extension is dropped if, when its batch is formed, the message is no longer held (returned,
deleted, rejected): an extension can never undo a return.

FIFO order: the messages of one group go through one lane, so a group's messages given back
together (one timeout, head first) become visible head first, and never while an extension of
another of them is still on its way. SQS hands out a group's next message as soon as any of
its held ones is visible again, so a later message visible before its head breaks the order.

Runs on the worker's event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from poller.logs import RateLimitedLog
from poller.sqs import SqsClient
from poller.stats import Counters

__all__ = ["VisibilityLanes"]

log = logging.getLogger(__name__)

# Codes of an entry whose receipt handle no longer works: the message is visible again already
# (or was deleted); it will be redelivered, which at-least-once allows.
_GONE_CODES = frozenset({"ReceiptHandleIsInvalid", "InvalidReceiptHandle", "MessageNotInflight",
                         "AWS.SimpleQueueService.MessageNotInflight"})


Item = tuple[str, "str | None"]
"""(receipt handle, FIFO message group or None): the group picks the lane."""


@dataclass(frozen=True, slots=True)
class _Change:
    handle: str
    timeout: int
    extension: bool  # False: a return, sent even if the message is no longer held


class VisibilityLanes:
    def __init__(
        self,
        sqs: SqsClient,
        *,
        lanes: int,
        still_held: Callable[[Sequence[str]], set[str]],
        extension_failed: Callable[[list[str]], None],
        visibility_lost: Callable[[list[str]], None],
        counters: Counters,
        linger: float = 0.02,
    ) -> None:
        self._sqs = sqs
        self._still_held = still_held
        self._extension_failed = extension_failed
        self._visibility_lost = visibility_lost
        self._counters = counters
        self._linger = linger
        self._lanes: list[deque[_Change]] = [deque() for _ in range(lanes)]
        self._draining: list[asyncio.Task[None] | None] = [None] * lanes
        self._closed = False
        self._failed_log = RateLimitedLog(log, "%d visibility change call(s) failed; last: %s")
        self._gone_log = RateLimitedLog(
            log, "%d message(s) were visible again before their visibility could be changed "
                 "(they will be redelivered); last: %s")

    def extend(self, items: Iterable[Item], timeout: int) -> None:
        for handle, group in items:
            self._add(_Change(handle, timeout, True), group)

    def give_back(self, items: Iterable[Item], timeout: int) -> None:
        """Make these visible again after ``timeout`` seconds, in this order within a group."""
        for handle, group in items:
            self._add(_Change(handle, timeout, False), group)

    async def close(self, timeout: float) -> bool:
        """Wait until what was asked so far is sent. False if that did not finish in time."""
        tasks = [task for task in self._draining if task is not None]
        if not tasks:
            return True
        _, pending = await asyncio.wait(tasks, timeout=max(timeout, 0.0))
        self._closed = True
        for task in pending:
            task.cancel()
        if pending:  # let the cancelled ones run their cleanup
            await asyncio.wait(pending, timeout=0.1)
        return not pending

    def _add(self, change: _Change, group: str | None) -> None:
        index = hash(change.handle if group is None else group) % len(self._lanes)
        self._lanes[index].append(change)
        if self._draining[index] is None:
            self._draining[index] = asyncio.get_running_loop().create_task(self._drain(index))

    async def _drain(self, index: int) -> None:
        lane = self._lanes[index]
        try:
            while lane:
                if len(lane) < 10:
                    await asyncio.sleep(self._linger)  # let a batch fill
                batch = [lane.popleft() for _ in range(min(10, len(lane)))]
                await self._send(batch)
        finally:
            self._draining[index] = None
            if lane and not self._closed:  # asked for while the last call was failing: go on
                self._draining[index] = asyncio.get_running_loop().create_task(self._drain(index))

    async def _send(self, batch: list[_Change]) -> None:
        latest: dict[str, _Change] = {}
        for change in batch:  # the last change asked for a message wins (a return after an extension)
            earlier = latest.pop(change.handle, None)
            if change.extension and earlier is not None and not earlier.extension:
                change = earlier  # but an extension never undoes a return
            latest[change.handle] = change
        extensions = [c.handle for c in latest.values() if c.extension]
        held = self._still_held(extensions) if extensions else set()
        changes = [c for c in latest.values() if not c.extension or c.handle in held]
        if not changes:
            return
        try:
            failures = await self._sqs.change_visibility_batch([(c.handle, c.timeout) for c in changes])
        except Exception as exc:  # noqa: BLE001 - SqsError, a credential refresh error...: never kill the lane
            self._failed_log.hit(str(exc))
            self._extension_failed([c.handle for c in changes if c.extension])
            return
        failed_extensions, lost = [], []
        for failure in failures:
            if not 0 <= failure.index < len(changes):
                continue
            change = changes[failure.index]
            if failure.code in _GONE_CODES:
                lost.append(change.handle)
                self._gone_log.hit(f"{failure.code} {failure.message}")
            elif change.extension:
                failed_extensions.append(change.handle)
                self._failed_log.hit(f"{failure.code} {failure.message}")
        if failed_extensions:
            self._extension_failed(failed_extensions)
        if lost:
            self._counters.add("expired", len(lost))
            self._visibility_lost(lost)
        not_extended = {*failed_extensions, *lost}
        extended = sum(1 for c in changes if c.extension and c.handle not in not_extended)
        if extended:
            self._counters.add("extended", extended)
