"""``DeleteMessageBatch`` for the worker: acked receipt handles in batches of up to 10.

A batch goes out when it is full or when its first handle has waited ``linger`` seconds
(Redpanda Connect's ack loop does the same with a ticker); batches are sent concurrently. Each
is retried with backoff until the messages' visibility would run out anyway (then they are
redelivered, which at-least-once allows); entries SQS reports under ``Failed`` are retried unless
the handle expired or SQS blames the request. When a batch is done, whatever became of it, the
worker is told (``done``): only then does it stop holding those messages.

Runs on the worker's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Sequence
from typing import Protocol

from poller.backoff import backoff
from poller.logs import RateLimitedLog
from poller.sqs import BatchFailure, SqsError, error_text
from poller.stats import Counters

__all__ = ["Deleter"]

log = logging.getLogger(__name__)

_EXPIRED_CODES = frozenset({"ReceiptHandleIsInvalid", "InvalidReceiptHandle"})
_RETRY_LIMIT = 45.0  # seconds a batch is retried at most


class BatchDeleter(Protocol):
    """What the deleter needs of SQS (``SqsClient``)."""

    async def delete_batch(self, receipt_handles: Sequence[str]) -> list[BatchFailure]: ...


class Deleter:
    def __init__(self, sqs: BatchDeleter, *, linger: float, visibility_timeout: float,
                 done: Callable[[Sequence[str]], None], counters: Counters,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._sqs = sqs
        # Looked up once: asyncio.get_running_loop() makes a getpid() syscall each time on 3.11.
        self._loop = loop
        self._linger = linger
        self._retry_for = min(max(visibility_timeout, 5.0), _RETRY_LIMIT)
        self._done = done
        self._counters = counters
        self._pending: list[str] = []
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.deadline = math.inf  # set at shutdown: no retry goes past it (loop time)
        self._retry_log = RateLimitedLog(log, "%d DeleteMessageBatch call(s) failed, retrying; last: %s")

    def add(self, handle: str) -> None:
        self._pending.append(handle)
        if len(self._pending) >= 10:
            self._flush()
        elif self._timer is None:
            self._timer = (self._loop or self._bind()).call_later(self._linger, self._flush)

    async def close(self, timeout: float) -> bool:
        """Send what is pending and wait for every batch, up to ``timeout``; False if cut short."""
        while self._pending:
            self._flush()
        if not self._tasks:
            return True
        _, pending = await asyncio.wait(set(self._tasks), timeout=max(timeout, 0.0))
        for task in pending:
            task.cancel()
        if pending:  # let the cancelled ones run their cleanup
            await asyncio.wait(pending, timeout=0.1)
        return not pending

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending[:10], self._pending[10:]
        loop = self._loop or self._bind()
        if self._pending:
            self._timer = loop.call_later(self._linger, self._flush)
        if batch:
            task = loop.create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _bind(self) -> asyncio.AbstractEventLoop:
        self._loop = asyncio.get_running_loop()
        return self._loop

    async def _send(self, handles: list[str]) -> None:
        pending = list(dict.fromkeys(handles))  # SQS refuses a batch with a handle twice
        loop = self._loop or self._bind()
        started = loop.time()
        deadline = min(started + self._retry_for, self.deadline)
        try:
            await self._delete(pending, deadline)
        finally:
            self._counters.observe("delete", loop.time() - started)
            self._done(handles)  # deleted, failed or expired: no longer the worker's to hold

    async def _delete(self, pending: list[str], deadline: float) -> None:
        loop = self._loop or self._bind()
        attempt = 0
        while pending:
            attempt += 1
            try:
                failures = await self._sqs.delete_batch(pending)
            except Exception as exc:  # noqa: BLE001 - SqsError, a credential refresh error: retry until the deadline
                delay = backoff(attempt, base=0.2, cap=5.0)
                # Permanent: not allowed, no such queue. A call refused for its time or for an
                # expired token is not (the client re-signs it once itself; then it is retried here).
                permanent = isinstance(exc, SqsError) and not exc.retryable
                if permanent or loop.time() + delay > min(deadline, self.deadline):
                    self._counters.add("delete_failed", len(pending))
                    log.error("deleting %d message(s) failed, they will be redelivered: %s",
                              len(pending), error_text(exc))
                    return
                self._retry_log.hit(error_text(exc))
                await asyncio.sleep(delay)
                continue
            self._counters.add("deleted", len(pending) - len(failures))
            retry = []
            for failure in failures:
                if not 0 <= failure.index < len(pending):
                    continue
                if failure.code in _EXPIRED_CODES or "expired" in failure.message.lower():
                    self._counters.add("expired")
                    log.warning("receipt handle expired before delete, the message will be "
                                "redelivered: %s %s", failure.code, failure.message)
                elif failure.sender_fault:
                    self._counters.add("delete_failed")
                    log.error("delete failed, the message will be redelivered: %s %s",
                              failure.code, failure.message)
                else:
                    retry.append(pending[failure.index])
            if not retry:
                return
            delay = backoff(attempt, base=0.2, cap=5.0)
            if loop.time() + delay > min(deadline, self.deadline):
                self._counters.add("delete_failed", len(retry))
                log.error("deleting %d message(s) failed, they will be redelivered", len(retry))
                return
            await asyncio.sleep(delay)
            pending = retry
