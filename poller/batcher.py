"""Collects items into batches of up to ``max_batch`` and flushes them from a few threads.

Used for ``DeleteMessageBatch``: a batch is flushed when it
is full or when its first item has waited ``linger`` seconds (Redpanda Connect's ack loop does
the same with a ticker). Each thread owns its own ``flush`` callable (and so its own SQS
connection), built by ``make_flush`` in that thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from poller.watchdog import Watchdog

__all__ = ["Batcher"]

T = TypeVar("T")
Flush = Callable[[Sequence[T]], None]

log = logging.getLogger(__name__)
_STOP = object()


class Batcher(Generic[T]):
    def __init__(self, name: str, make_flush: Callable[[], Flush[T]], *, threads: int = 1,
                 max_batch: int = 10, linger: float = 0.05, watchdog: Watchdog | None = None,
                 beat_limit: float = 60.0) -> None:
        self._name = name
        self._watchdog = watchdog or Watchdog()
        self._beat_limit = beat_limit  # longest healthy flush, retries included
        self._make_flush = make_flush
        self._max_batch = max_batch
        self._linger = linger
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True) for i in range(threads)
        ]
        self._started = False

    def start(self) -> None:
        self._started = True
        for thread in self._threads:
            thread.start()

    def add(self, item: T) -> None:
        self._queue.put(item)

    def close(self, timeout: float) -> bool:
        """Flush everything added so far, then stop. False if the threads did not finish in time."""
        if not self._started:
            return True
        self._queue.put(_STOP)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    def _run(self) -> None:
        name = threading.current_thread().name
        beat = self._watchdog.register(name, self._beat_limit)
        try:
            self._serve(beat)
        finally:
            self._watchdog.unregister(name)

    def _serve(self, beat: Callable[[], None]) -> None:
        flush = self._make_flush()
        stopping = False
        while not stopping:
            try:
                first = self._queue.get(timeout=1.0)
            except queue.Empty:
                beat()
                continue
            beat()
            if first is _STOP:
                self._queue.put(_STOP)  # let the other threads see it too
                break
            batch = [first]
            deadline = time.monotonic() + self._linger
            while len(batch) < self._max_batch:
                remaining = deadline - time.monotonic()
                try:
                    item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    self._queue.put(_STOP)
                    stopping = True
                    break
                batch.append(item)
            try:
                flush(batch)
            except Exception as exc:  # a flush must never kill the thread: the items come back via SQS
                log.error("%s: flushing %d entries failed: %s: %s", self._name, len(batch),
                          type(exc).__name__, exc, exc_info=log.isEnabledFor(logging.DEBUG))
