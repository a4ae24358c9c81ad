"""Reports to the event loop that published, for channels with threads of their own (librdkafka's
delivery reports come on the Kafka channel's poll thread; a file channel's writer thread): the
channel contract (``channels.base``) has every report made on the loop.

Reports made on another thread wait in an outbox; the first one of a batch schedules one
``call_soon_threadsafe``, so that a ``poll()`` serving hundreds of reports costs the loop one
wake-up, not one per record. A channel used without an event loop (a script, ``poller check``)
reports on the calling thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from channels.base import Message, Outcome, Report

__all__ = ["LoopReports"]

log = logging.getLogger(__name__)

_Pending = tuple[Report, Message, Outcome, str]


class LoopReports:
    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._lock = threading.Lock()
        self._outbox: list[_Pending] = []

    def bind(self) -> None:
        """Called in ``publish``: remember the loop it runs on (once; a worker has one loop)."""
        if self._loop is None:
            try:
                self._loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._loop_thread = threading.get_ident()

    def send(self, report: Report, message: Message, outcome: Outcome, reason: str) -> None:
        loop = self._loop
        if loop is None or threading.get_ident() == self._loop_thread:
            _call(report, message, outcome, reason)
            return
        with self._lock:
            self._outbox.append((report, message, outcome, reason))
            first = len(self._outbox) == 1
        if loop.is_closed():  # a flush scheduled before it closed never ran: made here, with this one
            self._flush()
        elif first:
            try:
                loop.call_soon_threadsafe(self._flush)
            except RuntimeError:  # it closed just now
                self._flush()

    def _flush(self) -> None:
        with self._lock:
            pending, self._outbox = self._outbox, []
        for report, message, outcome, reason in pending:
            _call(report, message, outcome, reason)


def _call(report: Report, message: Message, outcome: Outcome, reason: str) -> None:
    try:
        report(message, outcome, reason)
    except Exception:
        log.exception("report callback failed for message %s", message.id)
