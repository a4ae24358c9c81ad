"""Counters a worker keeps, and the periodic throughput line the supervisor logs from them."""

from __future__ import annotations

from collections.abc import MutableSequence, Sequence

__all__ = ["FIELDS", "GAUGES", "Counters", "format_line"]

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
)
GAUGES = frozenset({"in_flight", "circuit_open"})
_INDEX = {name: i for i, name in enumerate(FIELDS)}


class Counters:
    """Per-process counters, written by the worker's event loop only, copied out once a second.

    No lock: one thread writes them (the loop; channels' threads report through it).
    """

    __slots__ = ("_values",)

    def __init__(self) -> None:
        self._values = [0] * len(FIELDS)

    def add(self, name: str, n: int = 1) -> None:
        self._values[_INDEX[name]] += n

    def set(self, name: str, value: int) -> None:
        self._values[_INDEX[name]] = value

    def get(self, name: str) -> int:
        return self._values[_INDEX[name]]

    def snapshot(self) -> list[int]:
        return list(self._values)

    def copy_to(self, shared: MutableSequence[int]) -> None:
        shared[:] = self._values


def format_line(totals: Sequence[int], previous: Sequence[int], seconds: float) -> str:
    get = dict(zip(FIELDS, totals))
    rate = (get["acked"] - previous[_INDEX["acked"]]) / seconds if seconds > 0 else 0.0
    return (
        f"throughput {rate:,.0f} msg/s | received {get['received']:,} acked {get['acked']:,} "
        f"deleted {get['deleted']:,} in-flight {get['in_flight']:,} | retried {get['retried']:,} "
        f"returned {get['returned']:,} rejected {get['rejected']:,} delete-failed {get['delete_failed']:,} "
        f"expired {get['expired']:,} receive-errors {get['receive_errors']:,}"
    )
