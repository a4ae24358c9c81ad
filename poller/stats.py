"""What a worker counts and measures, and the periodic throughput line the supervisor logs.

A worker keeps counters, gauges and latency histograms in one flat list of integers, copied
once a second into a shared array that the supervisor reads: the same numbers feed the
throughput line and Prometheus, and the hot path pays a list increment for them.
"""

from __future__ import annotations

import bisect
from collections.abc import MutableSequence, Sequence

__all__ = ["AGE_BUCKETS", "BUCKETS", "FIELDS", "GAUGES", "HISTOGRAMS", "REJECT_REASONS", "SLOTS", "Counters",
           "format_line", "histogram", "histogram_count", "reject_reason"]

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
    "cpu_ms",          # gauge: CPU the worker process used since it started, ms (--processes auto)
    "receivers",       # gauge: long polls the receive window allows (--receivers, more 20 ms away; poller.window)
    # "rejected" by reason (REJECT_REASONS): a fixed few classes, never the reason's text
    "rejected_event",  # the message cannot be made an event (or a record)
    "rejected_sink",   # the sink or the broker refused the event
    "rejected_other",
)
REJECT_REASONS = ("event", "sink", "other")
GAUGES = frozenset({"in_flight", "circuit_open", "drained", "cpu_ms", "receivers"})
HISTOGRAMS = (
    "receive",  # a ReceiveMessage call, long-poll wait included
    "publish",  # a delivery: from the channel's publish to its verdict
    "delete",   # a DeleteMessageBatch call (its retries included)
    "age",      # a message's age when the channel acknowledged it: now minus SentTimestamp
)
# Upper bounds in seconds (Prometheus' le); a last bucket takes the rest (+Inf).
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# A message's age runs from milliseconds (a live queue) to days (a backlog).
AGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 21600.0, 86400.0)
_BUCKETS = {name: AGE_BUCKETS if name == "age" else BUCKETS for name in HISTOGRAMS}
_INDEX = {name: i for i, name in enumerate(FIELDS)}
# Each histogram: counts per bucket (+Inf included), the sum in microseconds, the count.
_H_START: dict[str, int] = {}
_end = len(FIELDS)
for _name in HISTOGRAMS:
    _H_START[_name] = _end
    _end += len(_BUCKETS[_name]) + 3
SLOTS = _end  # the shared array's length
# Per histogram: its first slot, its bounds, its sum's slot (the count's is the next); ``observe``
# reads it twice per message.
_H_SLOTS = {name: (start, _BUCKETS[name], start + len(_BUCKETS[name]) + 1) for name, start in _H_START.items()}


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
        start, buckets, sum_slot = _H_SLOTS[histogram]
        values = self._values
        values[start + bisect.bisect_left(buckets, seconds)] += 1
        values[sum_slot] += int(seconds * 1_000_000)
        values[sum_slot + 1] += 1

    def snapshot(self) -> list[int]:
        return list(self._values)

    def copy_to(self, shared: MutableSequence[int]) -> None:
        shared[:] = self._values


def histogram(values: Sequence[int], name: str) -> tuple[list[tuple[str, int]], float, int]:
    """(cumulative buckets as Prometheus wants them, sum in seconds, count) from a snapshot."""
    start, bounds, sum_slot = _H_SLOTS[name]
    counts = values[start:sum_slot]
    buckets, total = [], 0
    for bound, count in zip((*map(str, bounds), "+Inf"), counts, strict=True):
        total += count
        buckets.append((bound, total))
    return buckets, values[sum_slot] / 1_000_000, values[sum_slot + 1]


def histogram_count(values: Sequence[int], name: str) -> int:
    """How many observations a histogram of a snapshot holds (e.g. ReceiveMessage calls)."""
    return values[_H_SLOTS[name][2] + 1]


def reject_reason(reason: str) -> str:
    """The class of a reject's reason (``REJECT_REASONS``), for a metric label of few values."""
    if reason.startswith("cannot make") or "cannot make a CloudEvent" in reason:
        return "event"
    if any(mark in reason for mark in ("answered HTTP", "batchItemFailures", "Broker:", "too large")):
        return "sink"
    if any(mark in reason for mark in ("attribute", "content-type", "SentTimestamp", "base64", "JSON")):
        return "event"  # the channels' EventError texts
    return "other"


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
