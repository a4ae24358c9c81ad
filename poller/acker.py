"""The acker: what a verdict asks of SQS, and nothing else asks SQS to change a message.

``ack`` queues the delete (the message stays held until ``DeleteMessageBatch`` returned),
``reject`` leaves the message to the queue's redrive policy, ``nack`` gives messages back
(visible again after a backoff that grows with ``ApproximateReceiveCount``) and ``extend`` keeps
held messages invisible. Which of these happens is decided in one place, the dispatcher's
``settle``; the acker carries it out, counts it and logs it.

Runs on the worker's event loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Protocol

from poller.backoff import nack_visibility
from poller.ledger import Held, Ledger, Room, Stage
from poller.logs import RateLimitedLog
from poller.stats import Counters, reject_reason

__all__ = ["Acker", "DeleteQueue", "VisibilityChanges"]

log = logging.getLogger(__name__)

Item = tuple[str, "str | None"]  # (receipt handle, FIFO group): the group picks the visibility lane


class DeleteQueue(Protocol):
    """``poller.deleter.Deleter``: batches deletes, tells the ledger when each is done."""

    def add(self, handle: str) -> None: ...


class VisibilityChanges(Protocol):
    """``poller.visibility.VisibilityLanes``."""

    def extend(self, items: Sequence[Item], timeout: int) -> None: ...

    def give_back(self, items: Sequence[Item], timeout: int) -> None: ...


class Acker:
    def __init__(self, *, ledger: Ledger, room: Room, deletes: DeleteQueue, visibility: VisibilityChanges,
                 counters: Counters, nack_base: float, nack_cap: float) -> None:
        self._ledger = ledger
        self._room = room
        self._deletes = deletes
        self._visibility = visibility
        self._counters = counters
        self._nack_base = nack_base
        self._nack_cap = nack_cap
        self._returned_log = RateLimitedLog(log, "returned %d message(s) to SQS undelivered; last: %s")

    def ack(self, held: Held) -> None:
        """Delivered: delete it. It stays held (invisible, extended) until the delete returned."""
        held.stage = Stage.DELETING
        self._counters.add("acked")
        sent = held.message.attributes.get("SentTimestamp")
        if sent:
            try:
                self._counters.observe("age", max(time.time() - int(sent) / 1000, 0.0))
            except ValueError:
                pass
        self._deletes.add(held.message.ack_id)

    def reject(self, held: Held) -> None:
        """The sink will never take it: left to the queue's redrive policy, never deleted."""
        self._ledger.release(held.message.ack_id)
        self._counters.add("rejected")
        self._counters.add("rejected_" + reject_reason(held.reason))
        log.warning("rejected message %s: %s; left to the queue's redrive policy", held.message.id, held.reason)
        self._room.changed()

    def nack(self, helds: Sequence[Held], visibility: int | None = None, why: str = "") -> None:
        """Give these back undelivered, in this order, all with one visibility: ``visibility``,
        or the longest backoff their receive counts call for (so a FIFO group's head is never
        visible after a later message of it)."""
        if not helds:
            return
        if visibility is None:
            visibility = max(self._backoff(held) for held in helds)
        items = []
        for held in helds:
            self._ledger.release(held.message.ack_id)
            items.append((held.message.ack_id, held.message.group_id))
        self._counters.add("returned", len(items))
        self._visibility.give_back(items, visibility)
        if why:
            self._returned_log.hit(why)
        self._room.changed()

    def extend(self, helds: Sequence[Held], timeout: int) -> None:
        if helds:
            self._visibility.extend([(h.message.ack_id, h.message.group_id) for h in helds], timeout)

    def deleted(self, handles: Sequence[str]) -> None:
        """The delete batcher is done with these (deleted, or failed for good): no longer held."""
        for handle in handles:
            self._ledger.release(handle)
        self._room.changed()

    def _backoff(self, held: Held) -> int:
        try:
            receive_count = int(held.message.attributes.get("ApproximateReceiveCount", "1") or 1)
        except ValueError:
            receive_count = 1
        return nack_visibility(receive_count, base=self._nack_base, cap=self._nack_cap)
