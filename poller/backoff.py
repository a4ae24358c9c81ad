"""How long a message whose delivery failed stays invisible before SQS hands it out again."""

from __future__ import annotations

from channels.transport.backoff import backoff

__all__ = ["backoff", "nack_visibility"]


def nack_visibility(receive_count: int, *, base: float, cap: float) -> int:
    """Visibility timeout (whole seconds, as SQS wants) for a message whose delivery failed.

    Grows with SQS's own ``ApproximateReceiveCount``, so a dead sink is retried ever less often
    instead of spinning, and a restart of the poller does not reset the backoff.
    """
    return round(backoff(max(1, receive_count), base=base, cap=cap))
