"""The gate: the circuit with the runs it holds back while the channel is down, and its probes.

While the circuit (``poller.circuit``) is open, what would go to the channel is parked here
instead, and receiving waits. One parked run at a time goes out as the probe, when the
circuit's backoff says so; a failed probe goes to the back, so that the next probe tries
another run. The first delivery that gets an answer closes the circuit and everything parked
goes out again.

A state machine without timers: the dispatcher arms the probe timer from ``probe_delay`` and
asks for the probe with ``next_probe``. Not thread-safe: it lives on the worker's event loop.
"""

from __future__ import annotations

from collections import deque

from poller.circuit import Circuit
from poller.ledger import Ledger, Run, Stage

__all__ = ["Gate"]


class Gate:
    def __init__(self, circuit: Circuit, ledger: Ledger) -> None:
        self.circuit = circuit
        self._ledger = ledger
        self.parked: deque[Run] = deque()  # waiting for the circuit to close, probe order
        self._probes_since_receive = 0  # while open: probes since a receive brought new messages
        self._wedged_since: float | None = None

    @property
    def is_open(self) -> bool:
        return self.circuit.is_open

    # -- what the dispatcher reports -----------------------------------------------------

    def success(self) -> list[Run] | None:
        """A delivery got an answer. The parked runs, to send again, if this closed the circuit."""
        if not self.circuit.success():
            return None
        return self.take_parked()

    def failure(self, now: float, reason: str, *, wait: float, probe: bool) -> bool:
        """A delivery failed in a way worth retrying (``probe``: it was the probe). True if this
        opened the circuit."""
        opened = self.circuit.failure(now, reason, wait=wait)
        if probe:
            self.circuit.probe_failed(now, wait=wait)
        return opened

    def probe_ended(self, now: float) -> None:
        """The probe out was given back undecided (SQS's 12 hours, a stop): the next may go."""
        self.circuit.probe_failed(now)

    def received(self) -> None:
        """New messages came: a new round of probes may pass before the next receive."""
        self._probes_since_receive = 0

    # -- parked runs and probes ----------------------------------------------------------

    def park(self, run: Run) -> None:
        for held in run.entries:
            held.stage = Stage.WAITING
        self.parked.append(run)

    def unpark(self, run: Run) -> None:
        if run in self.parked:  # O(parked): only when a run is given back while parked
            self.parked.remove(run)

    def take_parked(self) -> list[Run]:
        parked, self.parked = list(self.parked), deque()
        return parked

    def probe_delay(self, now: float) -> float | None:
        """Seconds until the next probe may go; None while nothing is parked, or while a probe
        is out (its end arms the next one: a timer due now would only spin until then)."""
        if not self.parked or self.circuit.probing:
            return None
        return max(0.0, self.circuit.next_probe_at - now)

    def next_probe(self, now: float) -> Run | None:
        """The run to probe the channel with now, if the circuit's backoff lets one go."""
        if not self.circuit.is_open or not self.parked or not self.circuit.take_probe(now):
            return None
        run = self.parked.popleft()
        run.probe = True
        self._probes_since_receive += 1
        return run

    # -- what the receivers and the health check ask -------------------------------------

    def holds_receiving(self, receiving: bool) -> bool:
        """While the circuit is open, receiving waits, one receive at a time excepted when:
        nothing is left to probe the channel with (else an open circuit with nothing parked
        would never close), or every parked run was probed since the last new messages and
        none got through. Messages the sink refuses alike because of themselves (poison, the
        last ones on the queue) look like a broken sink; a new message lets the sink show it
        works. In a real outage this brings at most one batch per round of probes."""
        if not self.circuit.is_open:
            return False
        if receiving:
            return True
        if not any(h.stage is not Stage.DELETING for h in self._ledger):
            return False
        return self._probes_since_receive <= len(self.parked)

    def wedged(self, now: float, *, idle: bool, limit: float) -> str:
        """A reason when the circuit has been open for over ``limit`` seconds while ``idle``
        (nothing to probe with, nothing delivering, no receive under way). ``holds_receiving``
        makes that impossible; if it happens anyway, the heartbeat stops and the supervisor
        replaces the worker."""
        if not (self.circuit.is_open and idle and not self.parked):
            self._wedged_since = None
            return ""
        if self._wedged_since is None:
            self._wedged_since = now
        if now - self._wedged_since > limit:
            return f"the circuit has been open for {now - self._wedged_since:.0f}s with nothing to probe with"
        return ""
