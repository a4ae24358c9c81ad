"""The dispatcher: from received messages to verdicts, and the one place a verdict is decided.

- A receive's messages become *runs* (``poller.ledger``): one message, or the messages of one
  FIFO group from one receive, in order. The one FIFO sequencer is here: a group's next message
  goes out only after the previous one was acked, unless the channel ``keeps_order`` of what it
  gets together (Kafka); nothing of a group is acked ahead of a message of it that failed.
- ``--max-rate`` paces what goes to the channel; while the circuit is open, runs are parked in
  the gate (``poller.gate``) and one at a time probes the channel.
- The channel reports each message (``report``, on the loop). Once a run's window is reported,
  ``settle`` decides, in order: ACK -> the delete (``poller.acker``); REJECT -> left to the
  queue's redrive policy; RETRY -> sent again in place after a backoff (or the sink's
  ``Retry-After``), up to ``--retries`` times, then given back to SQS with a visibility backoff.
  An attempt held past ``--max-processing-time``, a message at SQS's 12 hours and whatever a
  stop finds are settled the same way. Nothing is deleted without an ACK.

Runs on the worker's event loop, with one clock (``clock``) for everything it times.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence

from channels.base import Channel, Message, Outcome
from poller.acker import Acker
from poller.backoff import backoff
from poller.gate import Gate
from poller.ledger import Held, Ledger, Room, Run, Stage
from poller.logs import RateLimitedLog
from poller.stats import Counters

__all__ = ["RETRY_AFTER_CAP", "Dispatcher", "Pacing", "RetryPolicy"]

log = logging.getLogger(__name__)

# A Retry-After is honoured up to this (seconds): an hour-long one would hold messages, and the
# worker's room for others, for that hour. The circuit's probes pace an outage anyway.
RETRY_AFTER_CAP = 60.0


class RetryPolicy:
    """In-place retries of a run: how many, and how long between them."""

    __slots__ = ("base", "cap", "retries")

    def __init__(self, retries: int, base: float, cap: float) -> None:
        self.retries, self.base, self.cap = retries, base, cap


class Pacing:
    """``--max-rate``: when the next message may go (0: no limit)."""

    __slots__ = ("next_at", "rate")

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.next_at = 0.0

    def start_of(self, window: int, now: float) -> float:
        start = max(now, self.next_at)
        self.next_at = start + window / self.rate
        return start


class Dispatcher:
    def __init__(self, *, channel: Channel, ledger: Ledger, room: Room, gate: Gate, acker: Acker,
                 counters: Counters, loop: asyncio.AbstractEventLoop, clock: Callable[[], float],
                 fail: Callable[[str], None], stop_visibility: Callable[[], int], visibility_timeout: int,
                 retry: RetryPolicy, pacing: Pacing) -> None:
        self._channel = channel
        self._ledger = ledger
        self._room = room
        self._gate = gate
        self._acker = acker
        self._counters = counters
        self._loop = loop
        self._loop_thread = threading.get_ident()  # built on the loop's thread
        self._clock = clock
        self._fail = fail
        self._stop_visibility = stop_visibility
        self._timeout = visibility_timeout
        self._retry = retry
        self._pacing = pacing if pacing.rate else None
        self._timers: dict[Run, asyncio.TimerHandle] = {}  # runs due later: retries, paced sends
        self._probe_timer: asyncio.TimerHandle | None = None
        self._publishing = False  # inside channel.publish: reports made now are decided after it
        self.stopping = False
        self._retry_log = RateLimitedLog(log, "%d delivery attempt(s) failed, retrying in place; last: %s")
        self._retry_after_log = RateLimitedLog(
            log, f"%d time(s) the channel asked to wait longer than {RETRY_AFTER_CAP:g} s before the next "
                 f"attempt (Retry-After); waited {RETRY_AFTER_CAP:g} s; last asked: %s")
        self._give_up_log = RateLimitedLog(log, "%d delivery attempt(s) given up after --max-processing-time; "
                                                "last: %s")
        self._limit_log = RateLimitedLog(
            log, "%d message(s) held for SQS's 12 hours of visibility after a receive given back "
                 "(visible again now, as they would be soon anyway); last: %s")

    # -- in -------------------------------------------------------------------------------

    def hand_over(self, messages: Sequence[Message]) -> None:
        """A receive's messages (room for them was reserved): held, and sent in runs."""
        self._counters.add("received", len(messages))
        now = self._clock()
        stop_visibility = self._stop_visibility() if self.stopping else None
        if stop_visibility is not None:  # a long poll that ended after the stop: all of it back
            log.info("returned %d message(s) a long poll brought after the stop (visible in %d s, when "
                     "the polls in flight have ended)", len(messages), stop_visibility)
        else:
            self._gate.received()
        for run in _runs_of(messages, now + self._timeout, now):
            run.entries = [held for held in run.entries if self._ledger.add(held)]
            if not run.entries:
                continue
            if stop_visibility is not None:
                self._settle(run, forced=stop_visibility)
            else:
                self._publish(run)

    # -- out ------------------------------------------------------------------------------

    def _publish(self, run: Run) -> None:
        """Hand the run's next window to the channel: now, after the pacing of ``--max-rate``,
        or once the circuit closes."""
        if not run.live:
            return
        if self._gate.is_open and not run.probe:
            self._park(run)
            return
        window = self._window(run)
        if self._pacing is not None:
            now = self._clock()
            start = self._pacing.start_of(window, now)
            if start > now + 0.001:
                self._schedule(run, start, paced=True)
                return
        self._dispatch(run, window)

    def _window(self, run: Run) -> int:
        return len(run.entries) if len(run.entries) == 1 or self._channel.keeps_order else 1

    def _dispatch(self, run: Run, window: int) -> None:
        run.attempt += 1
        run.window = run.unreported = window
        now = self._clock()
        for i, held in enumerate(run.entries):
            if i < window:
                held.stage, held.attempt_started, held.outcome, held.reason = Stage.DELIVERING, now, None, ""
            else:
                held.stage = Stage.WAITING
        messages = [held.message for held in run.entries[:window]]
        self._publishing = True
        try:
            self._channel.publish(messages, self.report)
        except Exception as exc:  # noqa: BLE001 - the channel is broken: restart the process, lose nothing
            self._fail(f"channel failed: {type(exc).__name__}: {exc}")
        finally:
            self._publishing = False

    def report(self, message: Message, outcome: Outcome, reason: str = "", retry_after: float = 0.0) -> None:
        """``channels.base.Report``: the channel's verdict on one message, on the loop.

        One bound method for every publish, not a closure per run: the ledger knows each
        message's run. A verdict given inside ``publish`` is decided once publish has returned,
        so that a decision never runs inside the channel's own call. A verdict from another
        thread breaks the channel's contract: the worker restarts, rather than decide off the loop."""
        if threading.get_ident() != self._loop_thread:
            if self._loop.is_closed():
                return  # the worker has ended: nothing is decided any more (redelivered later)
            self._loop.call_soon_threadsafe(
                self._fail, f"channel {type(self._channel).__name__} reported from thread "
                            f"{threading.current_thread().name}, not the event loop's (channels.base.Report)")
        elif self._publishing:
            self._loop.call_soon(self._on_report, message, outcome, reason, retry_after)
        else:
            self._on_report(message, outcome, reason, retry_after)

    def _on_report(self, message: Message, outcome: Outcome, reason: str, retry_after: float) -> None:
        held = self._ledger.get(message.ack_id)
        if held is None or held.message is not message or held.stage is not Stage.DELIVERING:
            return  # an attempt given up (returned), not ours, or not out: ignored
        if held.outcome is not None:
            return  # reported twice: the first verdict stands
        self._counters.observe("publish", self._clock() - held.attempt_started)
        held.outcome, held.reason, held.retry_after = outcome, reason, retry_after
        run = held.run
        run.unreported -= 1
        if not run.unreported:
            self._settle(run)

    # -- the decision ---------------------------------------------------------------------

    def _settle(self, run: Run, *, forced: int | None = None) -> None:
        """Decide what becomes of the run: the one place where an ack or a nack is decided.

        The verdicts of the run's window count in order: an ACK is deleted, a REJECT left to
        the redrive policy, and the first message without either stops the count; it and every
        later message of the run go on together. ``forced``: they go back to SQS with this
        visibility (SQS's 12 hours, a stop); otherwise, after a failure, they are retried in
        place, parked while the circuit is open, or given back once out of retries; after a
        window wholly answered, the run's next window goes out."""
        entries = run.entries
        if forced is None and len(entries) == 1 and entries[0].outcome is Outcome.ACK and not self._gate.is_open:
            # The common case, without the general bookkeeping: one message, delivered.
            run.live = False
            run.entries = []  # as below: no Held -> Run -> list -> Held cycle left for the collector
            self._gate.success()
            self._acker.ack(entries[0])
            return
        now = self._clock()
        was_probe, run.probe = run.probe, False  # whatever the outcome, this attempt was the probe
        decided = 0
        for held in entries[:run.window]:
            if held.outcome is Outcome.ACK:
                self._acker.ack(held)
            elif held.outcome is Outcome.REJECT:  # to the DLQ; the rest of its group goes on
                self._acker.reject(held)
            else:
                break
            decided += 1
        if decided:
            parked = self._gate.success()
            if parked is not None:
                self._circuit_closed(now, parked)
        failed = decided < run.window
        # A message acked after the failed one (a channel that keeps order) was never queued for
        # its delete: it goes again, after the failed one.
        run.entries = rest = entries[decided:]
        run.window = 0
        if not rest:
            run.live = False
            return
        reason, wait = rest[0].reason, rest[0].retry_after
        if failed and forced is None:
            if wait > RETRY_AFTER_CAP:
                self._retry_after_log.hit(f"{wait:g} s ({reason})")
                wait = RETRY_AFTER_CAP
            if self._gate.failure(now, reason, wait=wait, probe=was_probe):
                self._circuit_opened(reason)
        elif was_probe:
            self._gate.probe_ended(now)
            self._arm_probe()
        if forced is not None or self.stopping:
            self._give_back(run, forced if forced is not None else self._stop_visibility(), reason)
        elif not failed:
            self._publish(run)  # the group's next message(s)
        elif self._gate.is_open:
            self._park(run)  # a failed probe goes to the back: the next probe tries another run
        else:
            run.failures += 1
            if run.failures > self._retry.retries:
                self._give_back(run, None, reason)
            else:
                self._counters.add("retried", len(rest))
                self._retry_log.hit(reason)
                delay = max(wait, backoff(run.failures, base=self._retry.base, cap=self._retry.cap))
                self._schedule(run, now + delay)

    def _give_back(self, run: Run, visibility: int | None, why: str) -> None:
        """Return the run's messages to SQS undelivered, head first, with one visibility."""
        run.live = False
        timer = self._timers.pop(run, None)
        if timer is not None:
            timer.cancel()
        self._gate.unpark(run)
        self._acker.nack([held for held in run.entries if held.stage is not Stage.DELETING], visibility, why)

    # -- what the worker's housekeeping asks ----------------------------------------------

    def give_up_overdue(self, now: float, limit: float) -> None:
        """A delivery attempt held its run longer than ``limit`` (``--max-processing-time``):
        what was not reported failed, and is settled as any failure. The channel's own deadline
        is shorter (``WorkerConfig``), so this catches a channel that broke its contract; a
        report of the given-up attempt that comes later is ignored."""
        for run in self._ledger.overdue_runs(now, limit):
            if not run.live:
                continue
            reason = f"one delivery attempt held it for over {limit:g}s (--max-processing-time)"
            for held in run.entries[:run.window]:
                if held.outcome is None:
                    held.outcome, held.reason, held.retry_after = Outcome.RETRY, reason, 0.0
            run.unreported = 0
            self._give_up_log.hit(f"message {run.entries[0].message.id}: {reason}")
            self._settle(run)

    def give_back_at_limit(self, at_limit: Sequence[Held]) -> None:
        """SQS refuses to keep a message invisible longer than 12 hours after its receive: give
        its run back now (it would be visible again soon anyway), rather than fail an extension
        on every tick. A delete under way is left to finish."""
        for run in {id(h.run): h.run for h in at_limit if h.stage is not Stage.DELETING}.values():
            if run.live:
                self._limit_log.hit(f"message {run.entries[0].message.id}")
                self._settle(run, forced=0)

    def stop(self) -> None:
        """A stop: nothing new goes out; what waits for a retry, for pacing or for the circuit
        goes back now, visible once the long polls in flight have ended."""
        if self.stopping:
            return
        self.stopping = True
        self._cancel_probe()
        for run in [*self._gate.take_parked(), *self._timers]:
            self._settle(run, forced=self._stop_visibility())

    def give_back_all(self) -> None:
        """After the channel closed: whatever it did not report goes back too, in receipt order."""
        runs = {id(held.run): held.run for held in self._ledger if held.stage is not Stage.DELETING}
        visibility = self._stop_visibility()
        for run in runs.values():
            self._settle(run, forced=visibility)

    def wedged(self, *, receiving: bool, limit: float) -> str:
        idle = self._gate.is_open and not receiving and not self._timers and not self.stopping and not any(
            h.stage is Stage.DELIVERING for h in self._ledger)
        return self._gate.wedged(self._clock(), idle=idle, limit=limit)

    # -- the circuit ----------------------------------------------------------------------

    def _circuit_opened(self, reason: str) -> None:
        log.warning("circuit open: %d deliveries failed in a row (last: %s); receiving paused, "
                    "%d held message(s) kept and retried in place",
                    self._gate.circuit.threshold, reason, len(self._ledger))
        self._counters.set("circuit_open", 1)
        # Not from within this verdict: the shed requests' verdicts come back through it.
        self._loop.call_soon(self._shed)

    def _shed(self) -> None:
        """The circuit is open: what the channel has not sent yet is parked, not sent into the
        outage (else every request queued behind the in-flight limit becomes a duplicate)."""
        if self._gate.is_open:
            self._channel.shed()

    def _circuit_closed(self, now: float, parked: list[Run]) -> None:
        """The channel delivers again; everything parked goes out now."""
        log.warning("circuit closed after %.0fs: the channel delivers again; receiving resumes, "
                    "%d parked run(s) sent again", now - self._gate.circuit.opened_at, len(parked))
        self._counters.set("circuit_open", 0)
        self._cancel_probe()
        for run in parked:
            self._schedule(run, now)
        self._room.wake()

    def _park(self, run: Run) -> None:
        self._gate.park(run)
        self._arm_probe()

    def _cancel_probe(self) -> None:
        if self._probe_timer is not None:
            self._probe_timer.cancel()
            self._probe_timer = None

    def _arm_probe(self) -> None:
        """One probe at a time, when the circuit's backoff says so."""
        if self._probe_timer is not None or self.stopping:
            return
        delay = self._gate.probe_delay(self._clock())
        if delay is not None:
            self._probe_timer = self._loop.call_later(delay, self._probe)

    def _probe(self) -> None:
        self._probe_timer = None
        run = self._gate.next_probe(self._clock())
        if run is not None:
            log.info("circuit open: probing the channel with message %s", run.entries[0].message.id)
            self._publish(run)
        self._arm_probe()  # for after this probe (the circuit refuses another one meanwhile)

    # -- timers ---------------------------------------------------------------------------

    def _schedule(self, run: Run, at: float, *, paced: bool = False) -> None:
        """Publish the run at ``at`` (the clock's time): a retry, or (``paced``) its turn under
        ``--max-rate``."""
        run.paced = paced
        for held in run.entries:
            held.stage = Stage.WAITING
        previous = self._timers.pop(run, None)
        if previous is not None:
            previous.cancel()
        self._timers[run] = self._loop.call_later(max(0.0, at - self._clock()), self._due, run)

    def _due(self, run: Run) -> None:
        if self._timers.pop(run, None) is None or not run.live:
            return
        if not run.paced or (self._gate.is_open and not run.probe):
            self._publish(run)  # a retry: the circuit and the pacing have their say
            return
        run.paced = False
        self._dispatch(run, self._window(run))


def _runs_of(messages: Sequence[Message], visible_until: float, received_at: float) -> list[Run]:
    """One run per message, except that a FIFO group's messages of one receive form one run,
    kept in the order SQS gave them."""
    runs: list[Run] = []
    groups: dict[str, Run] = {}
    for message in messages:
        group = message.group_id
        run = groups.get(group) if group is not None else None
        if run is None:
            run = Run()
            runs.append(run)
            if group is not None:
                groups[group] = run
        run.entries.append(Held(message, run, visible_until, received_at))
    return runs
