"""One worker process: receive from SQS, publish to the channel, delete what was acknowledged.

Threads of a worker:

- ``receivers`` long-poll ``ReceiveMessage`` each; a receiver first reserves room for a whole
  batch below ``max_in_flight`` (dramatiq's bounded prefetch, Redpanda's
  ``max_outstanding_messages``), and does not receive while the circuit is open.
- the channel's own threads report each message's outcome (``_on_report``). ACK -> the delete
  batcher; REJECT -> logged, counted, left to the queue's redrive policy; RETRY -> retried in
  place after a backoff, up to ``retries`` times, then returned to SQS with a visibility backoff
  that grows with ``ApproximateReceiveCount``. Nothing is deleted without an ACK.
- the retrier publishes what is due again, and the circuit's probes.
- the delete batcher (``DeleteMessageBatch``); a message counts against ``max_in_flight`` until
  its delete has returned.
- the visibility lanes (``ChangeMessageVisibilityBatch``) and the extender that feeds them: every
  held message (delivering, waiting, or acked and not yet deleted) is extended before its
  visibility ends; a delivery attempt that holds a message past ``max_processing_time`` is given
  up and the message returned.
- the main thread sends the supervisor a heartbeat once a second while every loop beats (see
  ``poller.watchdog``) and the channel is not stalled, copies the counters out, and stops when
  the supervisor is gone.

The circuit (``poller.circuit``): after ``circuit_threshold`` failed deliveries in a row the
channel counts as down. Receiving stops, held messages stay invisible (extended) and are retried
one probe at a time; the first success closes the circuit. An outage therefore costs no receive
counts, and healthy messages do not reach the DLQ.

Shutdown (SIGTERM / SIGINT), within ``shutdown_timeout``: stop receiving (a long poll in progress
is broken off), return what waits for a retry (visibility 0, so it comes back at once), let the
channel finish or give back what it holds (``close``), return the rest, flush the deletes of
everything acknowledged, exit 0. The extender runs until the channel has closed.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, MutableSequence, Sequence
from dataclasses import dataclass, field
from typing import Any

from channels.base import Channel, ChannelError, Message, Outcome, Report
from poller.backoff import backoff, nack_visibility
from poller.batcher import Batcher
from poller.circuit import Circuit
from poller.config import WorkerConfig
from poller.ledger import Held, Ledger, Run, Stage
from poller.logs import RateLimitedLog, setup_logging
from poller.sqs import SqsClient, SqsError, load_credentials
from poller.stats import Counters
from poller.visibility import VisibilityLanes
from poller.watchdog import Watchdog

__all__ = ["EXIT_BOOT", "EXIT_OK", "Worker", "worker_main"]

EXIT_OK = 0
EXIT_BOOT = 3  # the worker cannot start (channel start failed); see the supervisor for what it does
EXIT_FAILED = 1  # the channel or a thread broke: the supervisor replaces the process

_EXPIRED_CODES = frozenset({"ReceiptHandleIsInvalid", "InvalidReceiptHandle"})
_DELETE_RETRY_LIMIT = 45.0  # seconds a delete is retried at most (the watchdog allows 60)
_LOOP_LIMIT = 60.0  # longest healthy gap between two beats of a housekeeping loop

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Effects:
    """What a decision taken under the lock asks for, done after the lock is released."""

    deletes: list[str] = field(default_factory=list)
    returns: dict[int, list[str]] = field(default_factory=dict)  # visibility -> handles
    rejected: list[Held] = field(default_factory=list)
    returned_because: str = ""  # the last failure of what was returned
    logs: list[tuple[int, str]] = field(default_factory=list)

    def give_back(self, held: Held, visibility: int) -> None:
        self.returns.setdefault(visibility, []).append(held.message.ack_id)


class Worker:
    def __init__(self, config: WorkerConfig, counters: Counters | None = None, *,
                 heartbeat: Callable[[], None] | None = None) -> None:
        self.config = config
        self.counters = counters or Counters()
        self._heartbeat = heartbeat
        self._stopping = threading.Event()
        self._failed = False  # the channel or a thread broke: exit non-zero, the supervisor restarts us
        self._mutex = threading.Lock()
        self._room = threading.Condition(self._mutex)  # receivers wait here for room / a closed circuit
        self._due = threading.Condition(self._mutex)  # the retrier waits here
        self._waiting = 0  # receivers waiting in _reserve
        self._ledger = Ledger(config.max_in_flight)
        self._circuit = Circuit(threshold=config.circuit_threshold)
        self._parked: deque[Run] = deque()  # waiting for the circuit to close
        self._scheduled: list[tuple[float, int, Run]] = []  # (due, seq, run): in-place retries
        self._sequence = itertools.count()
        self._retrier_stop = False
        self._extender_stop = threading.Event()
        self._hard_deadline = math.inf  # shutdown: no retry loop goes past it
        self._timeout = config.effective_visibility_timeout
        self._watchdog = Watchdog()
        self._receive_clients: list[SqsClient] = []
        self._credentials = load_credentials(config.target)
        self._channel: Channel | None = None
        self._deleter: Batcher[str] = Batcher(
            "deleter", self._make_delete_flush, threads=config.deleters, linger=config.delete_linger,
            watchdog=self._watchdog, beat_limit=_LOOP_LIMIT,
        )
        self._visibility = VisibilityLanes(
            self._new_client, lanes=max(2, min(16, -(-config.max_in_flight // 500))),
            still_held=self._still_held, extension_failed=self._extension_failed,
            visibility_lost=self._visibility_lost, counters=self.counters, watchdog=self._watchdog,
        )
        self._returned_log = RateLimitedLog(log, "returned %d message(s) to SQS undelivered; last: %s")
        self._retry_log = RateLimitedLog(log, "%d delivery attempt(s) failed, retrying in place; last: %s")
        self._receive_log = RateLimitedLog(log, "%d ReceiveMessage call(s) failed, retrying; last: %s")
        self._delete_log = RateLimitedLog(log, "%d DeleteMessageBatch call(s) failed, retrying; last: %s")
        self._stall_logged = ""

    # -- lifecycle ------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask for a graceful stop; safe from a signal handler (only sets an event)."""
        self._stopping.set()

    def fail(self, why: str) -> None:
        """Something broke that a new process fixes: stop, and exit non-zero."""
        log.error("%s; restarting the worker", why)
        self._failed = True
        self.stop()

    def run(self, tick: Callable[[], None] | None = None) -> int:
        config = self.config
        self._channel = config.channel.create(config.target.queue_url)
        try:
            self._channel.start()
        except ChannelError as exc:
            log.error("channel %s cannot start: %s", config.channel.name, exc)
            return EXIT_BOOT
        self._deleter.start()
        self._visibility.start()
        receivers = [
            threading.Thread(target=self._receive_loop, args=(i,), name=f"receiver-{i}", daemon=True)
            for i in range(config.receivers)
        ]
        retrier = threading.Thread(target=self._retry_loop, name="retrier", daemon=True)
        extender = threading.Thread(target=self._extend_loop, name="extender", daemon=True)
        for thread in (*receivers, retrier, extender):
            thread.start()
        log.info(
            "worker started: %d receivers, batch %d, wait %ds, max in flight %d, channel %s",
            config.receivers, config.batch_size, config.wait_time, config.max_in_flight,
            config.channel.name,
        )
        self._check_health()  # the first heartbeat: the supervisor knows the channel started
        while not self._stopping.wait(1.0):
            self._check_health()
            if tick is not None:
                tick()
        self._shutdown(receivers, retrier, extender)
        if tick is not None:
            tick()
        return EXIT_FAILED if self._failed else EXIT_OK

    def _check_health(self) -> None:
        """Heartbeat only while every loop beats and the channel is not stalled."""
        assert self._channel is not None
        problems = self._watchdog.late()
        stalled = self._channel.stalled()
        if stalled:
            problems.append(stalled)
        if problems:
            line = "; ".join(problems)
            if line != self._stall_logged:
                log.error("worker stalled (no heartbeat until it recovers): %s", line)
                self._stall_logged = line
            return
        if self._stall_logged:
            log.info("worker recovered")
            self._stall_logged = ""
        if self._heartbeat is not None:
            self._heartbeat()

    def _shutdown(self, receivers: Sequence[threading.Thread], retrier: threading.Thread,
                  extender: threading.Thread) -> None:
        deadline = time.monotonic() + self.config.shutdown_timeout
        self._hard_deadline = deadline
        log.info("stopping: %d message(s) held", len(self._ledger))
        with self._mutex:
            self._room.notify_all()
            clients = list(self._receive_clients)
        for client in clients:
            client.abort()
        for thread in receivers:
            thread.join(max(0.0, deadline - time.monotonic()))
        # What waits for a retry or for the circuit goes back at once.
        effects = _Effects()
        with self._mutex:
            self._retrier_stop = True
            self._due.notify_all()
            waiting = list(self._parked) + [run for _, _, run in self._scheduled]
            self._parked.clear()
            self._scheduled.clear()
            for run in waiting:
                self._return_run(run, effects, visibility=0)
        self._apply(effects)
        retrier.join(max(0.0, deadline - time.monotonic()))
        assert self._channel is not None
        # Leave a third of the time for the deletes and returns that closing produces.
        self._channel.close(timeout=max(0.5, (deadline - time.monotonic()) * 2 / 3))
        # Anything the channel did not report (it broke, or ran out of time) goes back too.
        effects = _Effects()
        with self._mutex:
            for held in list(self._ledger):
                if held.stage is not Stage.DELETING:
                    held.run.live = False
                    self._release(held)
                    effects.give_back(held, 0)
        self._apply(effects)
        self._extender_stop.set()  # only now: the channel's final deliveries were kept invisible
        extender.join(max(0.0, deadline - time.monotonic()))
        finished = self._deleter.close(max(0.5, deadline - time.monotonic()))
        finished &= self._visibility.close(max(0.5, deadline - time.monotonic()))
        c = self.counters
        log.info(
            "stopped: received %d, acked %d, deleted %d, retried %d, returned %d, rejected %d%s",
            c.get("received"), c.get("acked"), c.get("deleted"), c.get("retried"), c.get("returned"),
            c.get("rejected"),
            "" if finished else " (some deletes were cut short: those messages will be redelivered)",
        )

    def _new_client(self) -> SqsClient:
        return SqsClient(self.config.target, credentials=self._credentials)

    # -- receive --------------------------------------------------------------------------

    def _reserve(self, n: int, beat: Callable[[], None] = lambda: None) -> bool:
        """Wait until ``n`` more messages fit below ``max_in_flight`` and the circuit is closed;
        False when stopping."""
        with self._mutex:
            while not self._ledger.fits(n) or self._circuit.is_open:
                if self._stopping.is_set():
                    return False
                self._waiting += 1
                self._room.wait(0.5)
                self._waiting -= 1
                beat()
            if self._stopping.is_set():
                return False
            self._ledger.reserve(n)
            return True

    def _unreserve(self, n: int) -> None:
        with self._mutex:
            self._ledger.unreserve(n)
            self._room.notify_all()

    def _receive_loop(self, index: int) -> None:
        config = self.config
        name = f"receiver-{index}"
        # A long poll is bounded by its wait plus the client's deadline; backoff caps at 20 s.
        beat = self._watchdog.register(name, config.wait_time + _LOOP_LIMIT)
        client = self._new_client()
        with self._mutex:
            self._receive_clients.append(client)
        failures = 0
        try:
            while not self._stopping.is_set():
                if not self._reserve(config.batch_size, beat):
                    break
                beat()
                try:
                    raw = client.receive(
                        max_messages=config.batch_size,
                        wait_time=config.wait_time,
                        visibility_timeout=config.visibility_timeout,
                    )
                except Exception as exc:  # SqsError, a credential refresh error, a bug: retry
                    self._unreserve(config.batch_size)
                    if self._stopping.is_set():
                        break
                    failures += 1
                    self.counters.add("receive_errors")
                    self._receive_log.hit(_describe(exc))
                    self._stopping.wait(backoff(failures, base=0.5, cap=20.0))
                    continue
                failures = 0
                beat()
                self._hand_over(raw)
        finally:
            self._watchdog.unregister(name)
            client.close()

    def _hand_over(self, raw: list[dict[str, Any]]) -> None:
        messages = []
        for m in raw:
            try:
                messages.append(Message(
                    id=m["MessageId"],
                    body=m["Body"],
                    ack_id=m["ReceiptHandle"],
                    attributes=m.get("Attributes") or {},
                    message_attributes=m.get("MessageAttributes") or {},
                    md5_of_body=m.get("MD5OfBody", ""),
                ))
            except (KeyError, TypeError) as exc:  # cannot happen with SQS; never crash the receiver
                log.error("skipping a malformed message from SQS (%s); it will be redelivered", exc)
        visible_until = time.monotonic() + self._timeout
        runs = _runs_of(messages, visible_until)
        with self._mutex:
            self._ledger.unreserve(self.config.batch_size - len(messages))
            for run in runs:
                run.entries = [held for held in run.entries if self._ledger.add(held)]
            self._changed()
        if messages:
            self.counters.add("received", len(messages))
        for run in runs:
            if run.entries:
                self._publish(run)

    # -- delivery -------------------------------------------------------------------------

    def _publish(self, run: Run) -> None:
        """Hand a run to the channel (or park it while the circuit is open)."""
        with self._mutex:
            if not run.live:
                return
            if self._circuit.is_open and not run.probe:
                self._park(run)
                return
            run.attempt += 1
            run.unreported = len(run.entries)
            now = time.monotonic()
            for held in run.entries:
                held.stage, held.attempt_started, held.outcome, held.reason = Stage.DELIVERING, now, None, ""
            report = self._reporter(run, run.attempt)
            messages = [held.message for held in run.entries]
        assert self._channel is not None
        try:
            self._channel.publish(messages, report)
        except Exception as exc:  # the channel is broken: restart the process, lose nothing
            self.fail(f"channel failed: {_describe(exc)}")

    def _reporter(self, run: Run, attempt: int) -> Report:
        def report(message: Message, outcome: Outcome, reason: str) -> None:
            self._on_report(run, attempt, message, outcome, reason)

        return report

    def _on_report(self, run: Run, attempt: int, message: Message, outcome: Outcome, reason: str) -> None:
        """The channel's verdict on one message of a run; called from any thread."""
        with self._mutex:
            if not run.live or run.attempt != attempt:
                return  # a late report of an attempt that was given up
            held = next((h for h in run.entries if h.message is message), None)
            if held is None or held.outcome is not None:
                return  # not ours, or reported twice: the first verdict stands
            held.outcome, held.reason = outcome, reason
            run.unreported -= 1
            if run.unreported:
                return
            effects = self._settle(run)
        self._apply(effects)

    def _settle(self, run: Run) -> _Effects:
        """Every message of the run's attempt is reported: decide. Under the lock."""
        effects = _Effects()
        now = time.monotonic()
        answered = False
        failed: list[Held] = []
        for held in run.entries:
            if held.outcome is Outcome.ACK:
                held.stage = Stage.DELETING
                effects.deletes.append(held.message.ack_id)
                answered = True
            elif held.outcome is Outcome.REJECT:
                self._release(held)
                effects.rejected.append(held)
                answered = True
            else:
                failed.append(held)
        closed = answered and self._circuit.success()
        if closed:
            self._close_circuit(now, effects)
        if not failed:
            run.live = False
            self._changed()
            return effects
        run.entries = failed  # the rest of the run is retried, in order, as the run
        reason = failed[0].reason
        was_probe, run.probe = run.probe, False
        opened = self._circuit.failure(now, reason)
        if was_probe:
            self._circuit.probe_failed(now)
        if opened:
            effects.logs.append((logging.WARNING, (
                f"circuit open: {self._circuit.threshold} deliveries failed in a row (last: {reason}); "
                f"receiving paused, {len(self._ledger)} held message(s) kept and retried in place")))
            self.counters.set("circuit_open", 1)
        if self._stopping.is_set():
            self._return_run(run, effects, visibility=0)
        elif self._circuit.is_open:
            self._park(run, front=was_probe)
        else:
            run.failures += 1
            if run.failures > self.config.retries:
                self._return_run(run, effects)
            else:
                self.counters.add("retried", len(failed))
                self._retry_log.hit(reason)
                delay = backoff(run.failures, base=self.config.retry_backoff_base, cap=self.config.retry_backoff_max)
                self._schedule(run, now + delay)
        self._changed()
        return effects

    def _close_circuit(self, now: float, effects: _Effects) -> None:
        """Under the lock: the channel delivers again; everything parked goes out now."""
        effects.logs.append((logging.WARNING, (
            f"circuit closed after {now - self._circuit.opened_at:.0f}s: the channel delivers again; "
            f"receiving resumes, {len(self._parked)} parked run(s) sent again")))
        self.counters.set("circuit_open", 0)
        while self._parked:
            self._schedule(self._parked.popleft(), now)
        self._room.notify_all()

    def _park(self, run: Run, *, front: bool = False) -> None:
        for held in run.entries:
            held.stage = Stage.WAITING
        if front:
            self._parked.appendleft(run)
        else:
            self._parked.append(run)
        self._due.notify()

    def _schedule(self, run: Run, due: float) -> None:
        for held in run.entries:
            held.stage = Stage.WAITING
        heapq.heappush(self._scheduled, (due, next(self._sequence), run))
        self._due.notify()

    def _return_run(self, run: Run, effects: _Effects, *, visibility: int | None = None) -> None:
        """Under the lock: give the run's messages back to SQS, undelivered."""
        run.live = False
        for held in run.entries:
            if held.stage is Stage.DELETING:
                continue
            self._release(held)
            effects.give_back(held, self._return_visibility(held) if visibility is None else visibility)
            effects.returned_because = held.reason or effects.returned_because

    def _return_visibility(self, held: Held) -> int:
        try:
            receive_count = int(held.message.attributes.get("ApproximateReceiveCount", "1") or 1)
        except ValueError:
            receive_count = 1
        return nack_visibility(receive_count, base=self.config.nack_backoff_base, cap=self.config.nack_backoff_max)

    def _apply(self, effects: _Effects) -> None:
        """Carry out what a decision asked for, outside the lock."""
        if effects.deletes:
            self.counters.add("acked", len(effects.deletes))
            for handle in effects.deletes:
                self._deleter.add(handle)
        for visibility, handles in effects.returns.items():
            self.counters.add("returned", len(handles))
            self._visibility.give_back(handles, visibility)
        for held in effects.rejected:
            self.counters.add("rejected")
            log.warning("rejected message %s: %s; left to the queue's redrive policy", held.message.id, held.reason)
        if effects.returns and effects.returned_because:
            self._returned_log.hit(effects.returned_because)
        for level, line in effects.logs:
            log.log(level, line)

    # -- the retrier: in-place retries and the circuit's probes ----------------------------

    def _retry_loop(self) -> None:
        beat = self._watchdog.register("retrier", _LOOP_LIMIT)
        try:
            while True:
                beat()
                with self._mutex:
                    if self._retrier_stop:
                        return
                    due, probe, wake = self._take_due(time.monotonic())
                    if not due and probe is None:
                        self._due.wait(wake)
                        continue
                for run in due:
                    self._publish(run)
                if probe is not None:
                    log.info("circuit open: probing the channel with message %s", probe.entries[0].message.id)
                    self._publish(probe)
        finally:
            self._watchdog.unregister("retrier")

    def _take_due(self, now: float) -> tuple[list[Run], Run | None, float]:
        """Under the lock: the runs due for a retry, a probe if one may go out, and how long to
        sleep when there is neither."""
        due = []
        while self._scheduled and self._scheduled[0][0] <= now:
            due.append(heapq.heappop(self._scheduled)[2])
        probe = None
        if self._parked and self._circuit.take_probe(now):
            probe = self._parked.popleft()
            probe.probe = True
        wake = 1.0
        if self._scheduled:
            wake = min(wake, self._scheduled[0][0] - now)
        if self._parked and self._circuit.is_open:
            wake = min(wake, self._circuit.next_probe_at - now)
        return due, probe, max(wake, 0.005)

    # -- deletes --------------------------------------------------------------------------

    def _make_delete_flush(self) -> Callable[[Sequence[str]], None]:
        client = self._new_client()

        def flush(handles: Sequence[str]) -> None:
            pending = list(dict.fromkeys(handles))  # SQS refuses a batch with a handle twice
            deadline = min(time.monotonic() + min(max(self._timeout, 5.0), _DELETE_RETRY_LIMIT),
                           self._hard_deadline)
            try:
                self._delete(client, pending, deadline)
            finally:
                self._forget(pending)  # deleted, failed or expired: no longer ours to hold

        return flush

    def _forget(self, handles: Sequence[str]) -> None:
        with self._mutex:
            for handle in handles:
                held = self._ledger.get(handle)
                if held is not None:
                    self._release(held)
            self._changed()

    def _delete(self, client: SqsClient, pending: list[str], deadline: float) -> None:
        attempt = 0
        while pending:
            attempt += 1
            try:
                failures = client.delete_batch(pending)
            except Exception as exc:  # SqsError, a credential refresh error: retry until the deadline
                permanent = isinstance(exc, SqsError) and not exc.retryable
                if permanent or not _sleep_until(deadline, backoff(attempt, base=0.2, cap=5.0)):
                    self.counters.add("delete_failed", len(pending))
                    log.error("deleting %d message(s) failed, they will be redelivered: %s",
                              len(pending), _describe(exc))
                    return
                self._delete_log.hit(_describe(exc))
                continue
            self.counters.add("deleted", len(pending) - len(failures))
            retry = []
            for failure in failures:
                if not 0 <= failure.index < len(pending):
                    continue
                if failure.code in _EXPIRED_CODES or "expired" in failure.message.lower():
                    self.counters.add("expired")
                    log.warning("receipt handle expired before delete, the message will be "
                                "redelivered: %s %s", failure.code, failure.message)
                elif failure.sender_fault:
                    self.counters.add("delete_failed")
                    log.error("delete failed, the message will be redelivered: %s %s",
                              failure.code, failure.message)
                else:
                    retry.append(pending[failure.index])
            if retry and not _sleep_until(deadline, backoff(attempt, base=0.2, cap=5.0)):
                self.counters.add("delete_failed", len(retry))
                log.error("deleting %d message(s) failed, they will be redelivered", len(retry))
                return
            pending = retry

    # -- visibility -----------------------------------------------------------------------

    def _extend_loop(self) -> None:
        """Extend every held message before its visibility ends; give up overlong attempts."""
        timeout = self._timeout
        tick = min(5.0, max(0.25, timeout / 4))
        beat = self._watchdog.register("extender", _LOOP_LIMIT)
        try:
            while not self._extender_stop.wait(tick):
                beat()
                now = time.monotonic()
                with self._mutex:
                    due = self._ledger.due_for_extension(now, timeout / 2, timeout) if timeout > 0 else []
                    overdue = self._ledger.overdue_runs(now, self.config.max_processing_time)
                if due:
                    self._visibility.extend(due, timeout)
                for run in overdue:
                    self._give_up_attempt(run, now)
        finally:
            self._watchdog.unregister("extender")

    def _give_up_attempt(self, run: Run, now: float) -> None:
        """A delivery attempt held the run longer than ``max_processing_time``: return it."""
        effects = _Effects()
        with self._mutex:
            if not run.live or not any(h.stage is Stage.DELIVERING for h in run.entries):
                return
            if run.probe:
                run.probe = False
                self._circuit.probe_failed(now)
            for held in run.entries:
                if held.outcome is Outcome.ACK:  # delivered: delete it, as any ack
                    held.stage = Stage.DELETING
                    effects.deletes.append(held.message.ack_id)
                elif held.outcome is None:
                    held.reason = (f"one delivery attempt held it for over "
                                   f"{self.config.max_processing_time:g}s (--max-processing-time)")
            self._return_run(run, effects)
            self._changed()
        self._apply(effects)

    def _still_held(self, handles: Sequence[str]) -> set[str]:
        with self._mutex:
            return {handle for handle in handles if self._ledger.get(handle) is not None}

    def _extension_failed(self, handles: list[str]) -> None:
        with self._mutex:
            self._ledger.extension_failed(handles, time.monotonic())

    def _visibility_lost(self, handles: list[str]) -> None:
        with self._mutex:  # visible again already: extending it further is pointless
            for handle in handles:
                held = self._ledger.get(handle)
                if held is not None:
                    held.visible_until = math.inf

    # -- bookkeeping (under the lock) ------------------------------------------------------

    def _release(self, held: Held) -> None:
        self._ledger.release(held.message.ack_id)

    def _changed(self) -> None:
        self.counters.set("in_flight", len(self._ledger))
        if self._waiting:
            self._room.notify()


def _runs_of(messages: list[Message], visible_until: float) -> list[Run]:
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
        run.entries.append(Held(message, run, visible_until))
    return runs


def _sleep_until(deadline: float, seconds: float) -> bool:
    """Sleep ``seconds`` unless that passes ``deadline``; False (without sleeping) if it would."""
    if time.monotonic() + seconds > deadline:
        return False
    time.sleep(seconds)
    return True


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, SqsError) else f"{type(exc).__name__}: {exc}"


def worker_main(slot: int, config: WorkerConfig, shared_stats: MutableSequence[int],
                parent_pid: int, heartbeat: Any = None) -> None:
    """Entry point of a spawned worker process. ``heartbeat``: a shared double the worker sets
    to ``time.monotonic()`` while healthy (the clock is system-wide on Linux)."""
    setup_logging(config.log_level)
    counters = Counters()

    def beat() -> None:
        if heartbeat is not None:
            heartbeat.value = time.monotonic()

    try:
        worker = Worker(config, counters, heartbeat=beat)
    except Exception as exc:  # no credentials yet (a failing refresh): the supervisor retries
        log.error("worker cannot start: %s", _describe(exc))
        raise SystemExit(EXIT_FAILED) from None

    def on_signal(signum: int, frame: object) -> None:
        worker.stop()

    def on_thread_error(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        worker.fail(f"thread {args.thread.name if args.thread else '?'} died: "
                    f"{args.exc_type.__name__}: {args.exc_value}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    threading.excepthook = on_thread_error

    def tick() -> None:
        counters.copy_to(shared_stats)
        if os.getppid() != parent_pid:
            log.warning("the supervisor is gone; stopping")
            worker.stop()

    try:
        code = worker.run(tick)
    except Exception as exc:  # one line, not a traceback; the supervisor restarts us
        log.error("worker failed: %s", _describe(exc), exc_info=log.isEnabledFor(logging.DEBUG))
        code = EXIT_FAILED
    raise SystemExit(code)
