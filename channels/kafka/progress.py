"""Whether the producer, not the broker, stopped making progress.

A broker that is down makes records time out too, and there a new producer would not help: the
worker's circuit pauses instead. So a producer is judged stuck only on this evidence, gathered
while no record was delivered at all:

1. a record failed (timed out, or its producer id or sequence was refused), and then
2. the broker answered a metadata request (it is up), and then
3. a record produced *after* that answer failed too, and the broker still answers.

Seen with tansu restarted on memory storage (a cluster replaced behind the same address is the
same case): the broker has forgotten the producer id, answers every produce with
UNKNOWN_PRODUCER_ID, and librdkafka, which reads that as an idle producer's expired state, bumps
the epoch and sends again, for good (librdkafka INTRODUCTION.md, "Idempotent Producer" >
"RD_KAFKA_RESP_ERR_UNKNOWN_PRODUCER_ID"): every record times out while metadata works.

Pure bookkeeping: the channel calls it under its lock and asks the broker itself.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ProducerProgress"]


@dataclass(slots=True)
class ProducerProgress:
    """Evidence that the current producer is stuck; any delivery clears it."""

    answered_at: float | None = None  # the broker answered metadata then, with no delivery since
    check_due: bool = False  # a record failed: is the broker up?
    confirm_due: bool = False  # a record produced after answered_at failed: still up? then replace
    deliveries: int = 0  # a check's answer counts only if none came meanwhile

    def delivered(self) -> None:
        self.deliveries += 1
        self.answered_at = None
        self.check_due = self.confirm_due = False

    def failed(self, produced_at: float) -> None:
        """A record of the current producer failed with a timeout or an idempotence error."""
        if self.answered_at is not None and produced_at >= self.answered_at:
            self.confirm_due = True
        else:
            self.check_due = True

    def check(self) -> int | None:
        """A token to ask the broker with (then call :meth:`answered`), or None: nothing to ask."""
        return self.deliveries if self.check_due or self.confirm_due else None

    def answered(self, token: int, up: bool, now: float) -> bool:
        """The broker answered a metadata request at ``now`` (``up``) or not. True: replace the
        producer (the evidence is then used up)."""
        if token != self.deliveries:
            return False  # a record was delivered meanwhile: the producer works
        if not up:  # an outage: that is the circuit's business, not a reason for a new producer
            self.answered_at = None
            self.check_due = self.confirm_due = False
            return False
        if self.confirm_due:
            self.answered_at = None
            self.check_due = self.confirm_due = False
            return True
        self.check_due = False
        if self.answered_at is None:
            self.answered_at = now
        return False
