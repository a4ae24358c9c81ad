"""What a worker counts and measures, and the periodic throughput line the supervisor logs.

A worker keeps counters, gauges and latency histograms in one flat list of integers, copied
once a second into a shared array that the supervisor reads: the same numbers feed the
throughput line and Prometheus, and the hot path pays a list increment for them.
"""

from __future__ import annotations

import bisect
from collections.abc import MutableSequence, Sequence

__all__ = ["BUCKETS", "FIELDS", "GAUGES", "HISTOGRAMS", "SLOTS", "Counters", "format_line", "histogram"]

FIELDS = (
    "received",        # messages received from SQS
    "acked",           # acknowledged by the channel
    "deleted",         # deleted from SQS
    "retried",         # delivery attempts repeated in place after a failure
    "returned",        # given back to SQS undelivered (retries used up, held too long, shutdown)
    "rejected",        # refused for good by the channel; left to the redrive policy / DLQ
    "delete_failed",   # deletes that failed after retries (will be redelivered)
    "expired",         # receipt handle expired before delete (will be redelivered)
    "receive_errors",  # failed ReceiveMessage calls
    "extended",        # visibility extensions of slow in-flight messages
    "in_flight",       # gauge: held (delivering, waiting for a retry, or acked and not yet deleted)
    "circuit_open",    # gauge: 1 while the channel is down and receiving is paused
    "drained",         # gauge: 1 in batch mode once receives come back empty and nothing is held
)
GAUGES = frozenset({"in_flight", "circuit_open", "drained"})
HISTOGRAMS = (
    "receive",  # a ReceiveMessage call, long-poll wait included
    "publish",  # a delivery: from the channel's publish to its verdict
    "delete",   # a DeleteMessageBatch call (its retries included)
)
# Upper bounds in seconds (Prometheus' le); a last bucket takes the rest (+Inf).
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_H_SIZE = len(BUCKETS) + 3  # counts per bucket (+Inf included), the sum in microseconds, the count
SLOTS = len(FIELDS) + len(HISTOGRAMS) * _H_SIZE  # the shared array's length
_INDEX = {name: i for i, name in enumerate(FIELDS)}
_H_START = {name: len(FIELDS) + i * _H_SIZE for i, name in enumerate(HISTOGRAMS)}


class Counters:
    """Per-process counters and histograms, written by the worker's event loop only, copied out
    once a second.

    No lock: one thread writes them (the loop; channels' threads report through it).
    """

    __slots__ = ("_values",)

    def __init__(self) -> None:
        self._values = [0] * SLOTS

    def add(self, name: str, n: int = 1) -> None:
        self._values[_INDEX[name]] += n

    def set(self, name: str, value: int) -> None:
        self._values[_INDEX[name]] = value

    def get(self, name: str) -> int:
        return self._values[_INDEX[name]]

    def observe(self, histogram: str, seconds: float) -> None:
        start = _H_START[histogram]
        values = self._values
        values[start + bisect.bisect_left(BUCKETS, seconds)] += 1
        values[start + len(BUCKETS) + 1] += int(seconds * 1_000_000)
        values[start + len(BUCKETS) + 2] += 1

    def snapshot(self) -> list[int]:
        return list(self._values)

    def copy_to(self, shared: MutableSequence[int]) -> None:
        shared[:] = self._values


def histogram(values: Sequence[int], name: str) -> tuple[list[tuple[str, int]], float, int]:
    """(cumulative buckets as Prometheus wants them, sum in seconds, count) from a snapshot."""
    start = _H_START[name]
    counts = values[start:start + len(BUCKETS) + 1]
    buckets, total = [], 0
    for bound, count in zip((*map(str, BUCKETS), "+Inf"), counts, strict=True):
        total += count
        buckets.append((bound, total))
    return buckets, values[start + len(BUCKETS) + 1] / 1_000_000, values[start + len(BUCKETS) + 2]


def is_gauge(index: int) -> bool:
    """Slots that are a current value, not a running total (not summed across restarts)."""
    return index < len(FIELDS) and FIELDS[index] in GAUGES


def format_line(totals: Sequence[int], previous: Sequence[int], seconds: float) -> str:
    get = dict(zip(FIELDS, totals, strict=False))
    rate = (get["acked"] - previous[_INDEX["acked"]]) / seconds if seconds > 0 else 0.0
    return (
        f"throughput {rate:,.0f} msg/s | received {get['received']:,} acked {get['acked']:,} "
        f"deleted {get['deleted']:,} in-flight {get['in_flight']:,} | retried {get['retried']:,} "
        f"returned {get['returned']:,} rejected {get['rejected']:,} delete-failed {get['delete_failed']:,} "
        f"expired {get['expired']:,} receive-errors {get['receive_errors']:,}"
    )
