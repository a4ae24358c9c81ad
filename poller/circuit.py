"""The circuit breaker that turns a channel outage into a pause instead of a stream of nacks.

While the channel fails every delivery (all brokers unreachable, a sink refusing or failing every
request), returning messages to SQS would only raise their ``ApproximateReceiveCount`` until the
redrive policy moves healthy messages to the DLQ. So after ``threshold`` failed deliveries in a row
the circuit opens: the worker stops receiving, keeps what it holds (invisible, extended) and lets
one probe at a time through, after a growing backoff. The first delivery that succeeds closes it.
EventBridge Pipes and Lambda's SQS poller back off polling on target errors the same way.

Not thread-safe: it lives on the worker's event loop (the gate, ``poller.gate``, holds it).
"""

from __future__ import annotations

from poller.backoff import backoff

__all__ = ["Circuit"]


class Circuit:
    def __init__(self, *, threshold: int = 5, probe_base: float = 1.0, probe_cap: float = 10.0) -> None:
        if threshold < 1:
            raise ValueError("the circuit threshold must be at least 1")
        self.threshold = threshold
        self._probe_base = probe_base
        self._probe_cap = probe_cap
        self.is_open = False
        self.opened_at = 0.0
        self.last_failure = ""
        self._consecutive = 0
        self._probes = 0  # failed probes since the circuit opened
        self._probing = False
        self.next_probe_at = 0.0

    @property
    def probing(self) -> bool:
        """A probe is out: no other goes until it ended (``success`` or ``probe_failed``)."""
        return self._probing

    def success(self) -> bool:
        """A delivery got an answer (acked or rejected). True if this closed the circuit."""
        self._consecutive = 0
        if not self.is_open:
            return False
        self.is_open = self._probing = False
        self._probes = 0
        return True

    def failure(self, now: float, reason: str, *, wait: float = 0.0) -> bool:
        """A delivery failed in a way worth retrying. True if this opened the circuit.

        ``wait``: seconds the sink asked for (``Retry-After``); the next probe waits at least that.
        """
        self._consecutive += 1
        self.last_failure = reason
        if self.is_open or self._consecutive < self.threshold:
            return False
        self.is_open = True
        self.opened_at = now
        self._probes = 0
        self.next_probe_at = now + max(wait, backoff(1, base=self._probe_base, cap=self._probe_cap))
        return True

    def take_probe(self, now: float) -> bool:
        """True if one probe may go out now (open, none out, its backoff elapsed); it is then out."""
        if not self.is_open or self._probing or now < self.next_probe_at:
            return False
        self._probing = True
        return True

    def probe_failed(self, now: float, *, wait: float = 0.0) -> None:
        """The probe out failed (or was given up): the next one waits longer."""
        self._probing = False
        self._probes += 1
        self.next_probe_at = now + max(wait, backoff(self._probes + 1, base=self._probe_base, cap=self._probe_cap))
