"""``ChangeMessageVisibilityBatch`` for the worker: extensions of held messages and returns.

Changes are sent in batches of up to 10 from a few lanes (threads, each with its own SQS
connection), so extension keeps up with any ``--max-in-flight``. A message always goes through
the same lane (picked by its receipt handle) and a lane sends in the order changes were asked
for, so a return is never overtaken by an extension asked for before it. An extension is dropped
if, when its batch is formed, the message is no longer held (returned, deleted, rejected): an
extension can never undo a return.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from poller.logs import RateLimitedLog
from poller.sqs import SqsClient
from poller.stats import Counters
from poller.watchdog import Watchdog

__all__ = ["VisibilityLanes"]

log = logging.getLogger(__name__)

_STOP = object()
# Codes of an entry whose receipt handle no longer works: the message is visible again already
# (or was deleted); it will be redelivered, which at-least-once allows.
_GONE_CODES = frozenset({"ReceiptHandleIsInvalid", "InvalidReceiptHandle", "MessageNotInflight",
                         "AWS.SimpleQueueService.MessageNotInflight"})


@dataclass(frozen=True, slots=True)
class _Change:
    handle: str
    timeout: int
    extension: bool  # False: a return, sent even if the message is no longer held


class VisibilityLanes:
    def __init__(
        self,
        make_client: Callable[[], SqsClient],
        *,
        lanes: int,
        still_held: Callable[[Sequence[str]], set[str]],
        extension_failed: Callable[[list[str]], None],
        visibility_lost: Callable[[list[str]], None],
        counters: Counters,
        watchdog: Watchdog,
        linger: float = 0.02,
    ) -> None:
        self._make_client = make_client
        self._still_held = still_held
        self._extension_failed = extension_failed
        self._visibility_lost = visibility_lost
        self._counters = counters
        self._watchdog = watchdog
        self._linger = linger
        self._queues: list[queue.SimpleQueue[object]] = [queue.SimpleQueue() for _ in range(lanes)]
        self._threads = [
            threading.Thread(target=self._run, args=(i,), name=f"visibility-{i}", daemon=True)
            for i in range(lanes)
        ]
        self._deadline: float | None = None  # set by close(): give up retrying past it
        self._failed_log = RateLimitedLog(log, "%d visibility change call(s) failed; last: %s")
        self._gone_log = RateLimitedLog(
            log, "%d message(s) were visible again before their visibility could be changed "
                 "(they will be redelivered); last: %s")

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def extend(self, handles: Iterable[str], timeout: int) -> None:
        for handle in handles:
            self._lane(handle).put(_Change(handle, timeout, True))

    def give_back(self, handles: Iterable[str], timeout: int) -> None:
        for handle in handles:
            self._lane(handle).put(_Change(handle, timeout, False))

    def close(self, timeout: float) -> bool:
        """Send what was asked so far, then stop. False if that did not finish in time."""
        self._deadline = time.monotonic() + timeout
        for q in self._queues:
            q.put(_STOP)
        for thread in self._threads:
            if thread.is_alive():
                thread.join(max(0.0, self._deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    def _lane(self, handle: str) -> queue.SimpleQueue[object]:
        return self._queues[hash(handle) % len(self._queues)]

    def _run(self, index: int) -> None:
        name = f"visibility-{index}"
        beat = self._watchdog.register(name, 60.0)
        lane = self._queues[index]
        client = self._make_client()
        try:
            while True:
                try:
                    first = lane.get(timeout=1.0)
                except queue.Empty:
                    beat()
                    continue
                beat()
                if first is _STOP:
                    return
                batch = [first]
                stop = False
                deadline = time.monotonic() + self._linger
                while len(batch) < 10:
                    try:
                        item = lane.get(timeout=max(0.0, deadline - time.monotonic()))
                    except queue.Empty:
                        break
                    if item is _STOP:
                        stop = True
                        break
                    batch.append(item)
                self._send(client, batch)  # type: ignore[arg-type]
                if stop:
                    return
        finally:
            self._watchdog.unregister(name)
            client.close()

    def _send(self, client: SqsClient, batch: list[_Change]) -> None:
        latest: dict[str, _Change] = {}
        for change in batch:  # the last change asked for a message wins (a return after an extension)
            latest.pop(change.handle, None)
            latest[change.handle] = change
        extensions = [c.handle for c in latest.values() if c.extension]
        held = self._still_held(extensions) if extensions else set()
        changes = [c for c in latest.values() if not c.extension or c.handle in held]
        if not changes:
            return
        try:
            failures = client.change_visibility_batch([(c.handle, c.timeout) for c in changes])
        except Exception as exc:  # SqsError, a credential refresh error...: never kill the lane
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
