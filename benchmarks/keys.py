"""The benchmark's message bodies, and how a sink finds which message (and when it was sent) in what it got.

Every contender forwards the same SQS bodies, but wraps them differently: the poller and the boto3
loops send the whole SQS message as JSON (the body becomes an escaped string: ``\\"order\\":7``),
mq-bridge posts the raw body. So the key (``order``) and the send stamp (``sent_us``, wall-clock
microseconds, for latency) are found with patterns that match both forms. No contender is asked
to do anything special (no headers, no ids of its own), so none is favoured.
"""

from __future__ import annotations

import re
import time

__all__ = ["body", "make_bodies", "order_of", "sent_us_of", "stamped_body"]

# `order\":123` inside an escaped JSON string, or `order":123` in a raw body.
_ORDER = re.compile(rb'order\\?":(\d+)')
_SENT = re.compile(rb'sent_us\\?":(\d+)')


def body(order: int, size: int, *, sent_us: int = 0) -> str:
    """A JSON body of about ``size`` bytes (at least the two fields), like a small order event."""
    head = f'{{"order":{order},"sent_us":{sent_us},"customer":"c-{order % 997}","note":"'
    return head + "x" * max(0, size - len(head) - 2) + '"}'


def make_bodies(count: int, size: int) -> list[str]:
    """``count`` distinct bodies (orders 0..count-1) without a send stamp: the throughput cases."""
    return [body(i, size) for i in range(count)]


def stamped_body(order: int, size: int) -> str:
    """A body stamped with the current wall-clock time: the latency case."""
    return body(order, size, sent_us=time.time_ns() // 1000)


def order_of(payload: bytes) -> int | None:
    match = _ORDER.search(payload)
    return int(match.group(1)) if match else None


def sent_us_of(payload: bytes) -> int:
    match = _SENT.search(payload)
    return int(match.group(1)) if match else 0
