"""How many receives a process runs: ``--receivers``, plus those SQS's round trip calls for.

A receive of ``batch`` messages is under way for a round trip, so carrying ``rate`` messages a
second takes ``rate * round_trip / batch`` receives under way (Little's law), besides the
``--receivers`` that wait in long polls for what comes next. With SQS a millisecond away that is
one more receive at most; 20 ms away at 2,500 msg/s it is five. A fixed count sized for the far
case would queue needless requests on a near server; one sized for the near case (a fixed 8) kept
0.70-0.76 of its direct rate 20 ms away (``benchmarks/``, "SQS +20 ms").

The round trip is the least time a *full* receive took over the last ``_RTT_SPAN`` to
``2 * _RTT_SPAN`` seconds (BBR's windowed min-RTT): a full receive found messages waiting, so it
did not wait in the long poll; the least one is the closest to the wire's time, without the
server's queueing. With no full receive in that span (no backlog) the round trip is unknown and
the window falls back to ``--receivers``. The rate is the messages received over the last
second. The rate feeds back (more receives, more rate) with a gain of the round trip over the
time a receive takes on average: below one where the server queues (the window settles, as a
saturated LocalStack's does), near one where it does not (real SQS with a backlog: the window
grows to ``ceiling``, ``--max-receivers``). ``--max-in-flight`` still bounds the room each
receive reserves.

Runs on the worker's event loop.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["ReceiveWindow"]

_PERIOD = 1.0  # seconds over which the rate is counted and the window moves
_RTT_SPAN = 10.0  # a full receive's round trip counts for 10-20 s (two spans kept)


class ReceiveWindow:
    def __init__(self, floor: int, ceiling: int, batch: int, clock: Callable[[], float]) -> None:
        self.floor = floor
        self.ceiling = max(floor, ceiling)
        self.limit = floor  # receivers 0 .. limit - 1 receive; the others wait
        self._batch = batch
        self._clock = clock
        now = clock()
        self._period_start = now
        self._received = 0  # messages, this period
        self._span_start = now
        self._rtt_now = float("inf")  # least full round trip this span,
        self._rtt_before = float("inf")  # ... and the span before

    @property
    def round_trip(self) -> float | None:
        """The least full receive's time over the last 10-20 s, None without one."""
        rtt = min(self._rtt_now, self._rtt_before)
        return None if rtt == float("inf") else rtt

    def received(self, got: int, asked: int, took: float) -> None:
        """One receive's answer: ``got`` of ``asked`` messages in ``took`` seconds."""
        now = self._clock()
        if now - self._span_start >= _RTT_SPAN:
            # one span gone: the older one ages out (a whole idle span: both do)
            self._rtt_before = self._rtt_now if now - self._span_start < 2 * _RTT_SPAN else float("inf")
            self._rtt_now = float("inf")
            self._span_start = now
        if got >= asked and took < self._rtt_now:
            self._rtt_now = took
        self._received += got
        elapsed = now - self._period_start
        if elapsed >= _PERIOD:
            self._move(self._received / elapsed)
            self._period_start = now
            self._received = 0

    def _move(self, rate: float) -> None:
        rtt = self.round_trip
        extra = 0 if rtt is None else round(rate * rtt / self._batch)
        self.limit = min(self.ceiling, self.floor + extra)
