"""One worker process: receive from SQS, publish to the channel, delete what was acknowledged.

Everything runs on one event loop (uvloop), on the process's main thread:

- ``receivers`` tasks long-poll ``ReceiveMessage``; each first reserves room for a whole batch
  below ``max_in_flight`` (dramatiq's bounded prefetch, Redpanda's ``max_outstanding_messages``)
  and does not receive while the circuit is open.
- the channel is handed *runs* (one message; or the messages of one FIFO group from one receive,
  in order). The one FIFO sequencer is here: a group's next message goes out only after the
  previous one was acked, unless the channel ``keeps_order`` of what it gets together (Kafka), and
  nothing of a group is acked ahead of a message of it that failed.
- the channel reports each message (``_on_report``; from its own threads too, brought to the
  loop). ACK -> the delete batcher (``poller.deleter``); REJECT -> logged, counted, left to the
  queue's redrive policy; RETRY -> sent again in place after a backoff (or the sink's
  ``Retry-After``), up to ``retries`` times, then returned to SQS with a visibility backoff that
  grows with ``ApproximateReceiveCount``. Nothing is deleted without an ACK.
- the extender extends, through the visibility lanes (``poller.visibility``), every held message
  (delivering, waiting, or acked and not yet deleted) before its visibility ends, and gives up a
  delivery attempt that holds a message past ``max_processing_time`` (the message is returned).
- a heartbeat task tells the supervisor the worker is alive once a second, while every loop
  beats (``poller.watchdog``), the channel is not stalled and the loop itself is not blocked.

A message is held (``poller.ledger``) from its receipt until its delete returned, it was
returned, or rejected: all that time it counts against ``max_in_flight`` and is extended.

The circuit (``poller.circuit``): after ``circuit_threshold`` failed deliveries in a row the
channel counts as down. Receiving stops, held messages stay invisible (extended) and are retried
one probe at a time; the first success closes the circuit. An outage therefore costs no receive
counts, and healthy messages do not reach the DLQ.

Shutdown (SIGTERM / SIGINT), within ``shutdown_timeout``: stop receiving, return what waits for
a retry, let the channel finish or give back what it holds (``aclose``), return the rest, flush
the deletes of everything acknowledged, exit 0. Long polls in progress are let finish (within
``--wait-time``), because SQS still hands messages to a poll until it returns: one broken off
would leave them invisible for the visibility timeout. What the stop gives back (and what those
polls bring) is visible again once every poll in flight has ended (``_stop_visibility``). The
extender runs until the channel has closed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, MutableSequence, Sequence
from dataclasses import dataclass, field
from typing import Any

from channels.base import Channel, ChannelError, Message, Outcome
from poller.backoff import backoff, nack_visibility
from poller.circuit import Circuit
from poller.config import WorkerConfig
from poller.deleter import Deleter
from poller.ledger import Held, Ledger, Run, Stage
from poller.logs import RateLimitedLog, setup_logging
from poller.sqs import SqsClient, SqsError, load_credentials
from poller.stats import Counters
from poller.visibility import VisibilityLanes
from poller.watchdog import Watchdog

__all__ = ["EXIT_BOOT", "EXIT_OK", "Worker", "worker_main"]

EXIT_OK = 0
EXIT_FAILED = 1  # the channel or a task broke: the supervisor replaces the process
EXIT_BOOT = 3  # the worker cannot start (channel start failed); see the supervisor for what it does

_LOOP_LIMIT = 60.0  # longest healthy gap between two beats of a housekeeping loop
# A Retry-After is honoured up to this (seconds): an hour-long one would hold messages, and the
# worker's room for others, for that hour. The circuit's probes pace an outage anyway.
RETRY_AFTER_CAP = 60.0
# --until-empty: after an empty receive, a receiver polls this long, so that once the queue is
# drained the poller stops within about this, not within a whole --wait-time.
_DRAINING_WAIT = 1
# At shutdown, this much of the deadline is kept for what comes after the long polls.
_AFTER_POLLS = 2.0
# The circuit is open, nothing is left to probe with and no receive brings one: never for long.
_WEDGE_AFTER = 30.0
# ReceiveMessage refused for good (AccessDenied, the queue gone) this long: no more heartbeats.
_REFUSED_FOR = 60.0

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Effects:
    """What a decision asks the SQS side for, done once the decision is complete."""

    deletes: list[str] = field(default_factory=list)
    # visibility -> (handle, FIFO group): a run's messages in order, with one visibility
    returns: dict[int, list[tuple[str, str | None]]] = field(default_factory=dict)
    rejected: list[Held] = field(default_factory=list)
    returned_because: str = ""  # the last failure of what was returned

    def give_back(self, held: Held, visibility: int) -> None:
        message = held.message
        self.returns.setdefault(visibility, []).append((message.ack_id, message.group_id))


class Worker:
    def __init__(self, config: WorkerConfig, counters: Counters | None = None, *,
                 heartbeat: Callable[[], None] | None = None, budget: Any = None) -> None:
        self.config = config
        self.counters = counters or Counters()
        self._heartbeat = heartbeat
        # --max-messages: a shared multiprocessing.Value the workers take from before receiving.
        self._budget = budget
        self._budget_spent = False
        self._receiving = 0  # ReceiveMessage calls in flight
        self._polls_end = 0.0  # loop time by which every long poll started so far has ended
        self._poll_wait = config.wait_time  # the long-poll wait in use (--until-empty shortens it)
        self._stopped_at = 0.0  # loop time of the stop
        self._empty_receives = 0  # since the last message (batch mode: --until-empty)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._stopping = False
        self._stop_event: asyncio.Event | None = None
        self._failed = False  # the channel or a task broke: exit non-zero, the supervisor restarts us
        self._ledger = Ledger(config.max_in_flight)
        self._circuit = Circuit(threshold=config.circuit_threshold)
        self._parked: deque[Run] = deque()  # waiting for the circuit to close
        self._timers: dict[Run, asyncio.TimerHandle] = {}  # runs due later: retries, paced sends
        self._probe_timer: asyncio.TimerHandle | None = None
        self._room_waiters: list[asyncio.Future[None]] = []  # receivers waiting for room
        self._publishing = False  # inside channel.publish: reports made now are deferred
        self._rate = config.max_rate  # messages per second for this process (0: no limit)
        self._rate_next = 0.0  # pacing: when the next message may go (loop time)
        self._timeout = config.effective_visibility_timeout
        self._watchdog = Watchdog()
        self._credentials = load_credentials(config.target)
        self._channel: Channel | None = None
        self._sqs: SqsClient | None = None  # deletes and visibility changes
        self._receive_sqs: SqsClient | None = None  # long polls: aborted at shutdown
        self._deleter: Any = None
        self._visibility: Any = None
        self._returned_log = RateLimitedLog(log, "returned %d message(s) to SQS undelivered; last: %s")
        self._retry_log = RateLimitedLog(log, "%d delivery attempt(s) failed, retrying in place; last: %s")
        self._receive_log = RateLimitedLog(log, "%d ReceiveMessage call(s) failed, retrying; last: %s")
        self._retry_after_log = RateLimitedLog(
            log, f"%d time(s) the channel asked to wait longer than {RETRY_AFTER_CAP:g} s before the next "
                 f"attempt (Retry-After); waited {RETRY_AFTER_CAP:g} s; last asked: %s")
        self._give_up_log = RateLimitedLog(log, "%d delivery attempt(s) given up after --max-processing-time; "
                                                "last: %s")
        self._limit_log = RateLimitedLog(
            log, "%d message(s) held for SQS's 12 hours of visibility after a receive given back "
                 "(visible again now, as they would be soon anyway); last: %s")
        self._wedged_since = 0.0  # the circuit open with nothing to probe with, since (monotonic)
        self._probes_since_receive = 0  # while the circuit is open: probes since new messages came
        self._refused = ("", 0.0)  # the last permanent ReceiveMessage error, and since when
        self._stall_logged = ""

    # -- lifecycle ------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask for a graceful stop. From the loop (signal handlers are installed on it)."""
        if not self._stopping and self._loop is not None:
            self._stopped_at = self._loop.time()
        self._stopping = True
        if self._stop_event is not None:
            self._stop_event.set()

    def fail(self, why: str) -> None:
        """Something broke that a new process fixes: stop, and exit non-zero. From the loop."""
        log.error("%s; restarting the worker", why)
        self._failed = True
        self.stop()

    def fail_threadsafe(self, why: str) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.fail, why)

    async def run(self, tick: Callable[[], None] | None = None) -> int:
        config = self.config
        self._loop = loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._stop_event = asyncio.Event()
        if self._stopping:
            self._stop_event.set()
        channel = config.channel.create(config.target.queue_url)
        try:
            await asyncio.to_thread(channel.start)  # may block (Kafka checks the broker)
        except ChannelError as exc:
            log.error("channel %s cannot start: %s", config.channel.name, exc)
            return EXIT_BOOT
        self._channel = channel
        self._start_sqs_side()
        receivers = [self._task(self._receive_loop(i), f"receiver-{i}") for i in range(config.receivers)]
        extender = self._task(self._extend_loop(), "extender")
        health = self._task(self._health_loop(tick), "heartbeat")
        log.info(
            "worker started: %d receivers, batch %d, wait %ds, max in flight %d, channel %s",
            config.receivers, config.batch_size, config.wait_time, config.max_in_flight,
            config.channel.name,
        )
        self._check_health()  # the first heartbeat: the supervisor knows the channel started
        await self._stop_event.wait()
        await self._shutdown(receivers, extender)
        health.cancel()
        if tick is not None:
            tick()
        del loop
        return EXIT_FAILED if self._failed else EXIT_OK

    def _start_sqs_side(self) -> None:
        config = self.config
        lanes = max(2, min(16, -(-config.max_in_flight // 500)))
        self._sqs = SqsClient(config.target, credentials=self._credentials, connections=lanes + 32)
        self._receive_sqs = SqsClient(config.target, credentials=self._credentials, connections=config.receivers)
        self._deleter = Deleter(self._sqs, linger=config.delete_linger, visibility_timeout=self._timeout,
                                done=self._forget, counters=self.counters, loop=self._loop)
        self._visibility = VisibilityLanes(
            self._sqs, lanes=lanes, still_held=self._still_held, extension_failed=self._extension_failed,
            visibility_lost=self._visibility_lost, counters=self.counters,
        )

    def _task(self, coro: Awaitable[None], name: str) -> asyncio.Task[None]:
        """A long-lived task: an exception escaping it is one log line and a worker restart."""
        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.fail(f"{name} failed: {type(exc).__name__}: {exc}")

        assert self._loop is not None
        return self._loop.create_task(guarded(), name=name)

    async def _health_loop(self, tick: Callable[[], None] | None) -> None:
        while True:
            await asyncio.sleep(1.0)
            self._check_health()
            if tick is not None:
                tick()

    def _check_health(self) -> None:
        """Heartbeat only while every loop beats and the channel is not stalled; the loop itself
        being free to run this is the rest of the proof."""
        assert self._channel is not None
        problems = self._watchdog.late()
        stalled = self._channel.stalled()
        if stalled:
            problems.append(stalled)
        wedged = self._wedged()
        if wedged:
            problems.append(wedged)
        refused, since = self._refused
        if refused and time.monotonic() - since > _REFUSED_FOR:
            # Permission taken away, queue deleted: a new process re-runs the start check, which
            # says why in one line (the supervisor replaces a worker without heartbeats).
            problems.append(f"ReceiveMessage refused for {time.monotonic() - since:.0f}s: {refused}")
        self.counters.set("in_flight", len(self._ledger))
        self.counters.set("drained", int(self._drained()))
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

    def _drained(self) -> bool:
        """Batch mode: nothing held, nothing being received, and either the --max-messages
        budget is spent or every receiver's last receive came back empty."""
        if len(self._ledger):
            return False
        if self._budget_spent:
            return not self._receiving  # what the last receives bring must be delivered first
        return self.config.until_empty and self._empty_receives >= self.config.receivers

    def _take_budget(self, n: int) -> int:
        """How many of ``n`` messages this receive may ask for under --max-messages."""
        if self._budget is None:
            return n
        with self._budget.get_lock():
            take = max(0, min(n, self._budget.value))
            self._budget.value -= take
        if take == 0:
            self._budget_spent = True
        return take

    def _give_back_budget(self, n: int) -> None:
        if self._budget is not None and n > 0:
            with self._budget.get_lock():
                self._budget.value += n

    async def _shutdown(self, receivers: Sequence[asyncio.Task[None]], extender: asyncio.Task[None]) -> None:
        assert self._loop is not None and self._channel is not None
        loop = self._loop
        deadline = loop.time() + self.config.shutdown_timeout
        self._deleter.deadline = deadline
        log.info("stopping: %d message(s) held, %d long poll(s) in flight", len(self._ledger), self._receiving)
        self._wake_receivers()  # those waiting for room stop; those polling hand back what they get
        # What waits for a retry, for pacing or for the circuit goes back at once.
        effects = _Effects()
        waiting = list(self._parked) + list(self._timers)
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        self._parked.clear()
        if self._probe_timer is not None:
            self._probe_timer.cancel()
        for run in waiting:
            self._return_run(run, effects, visibility=self._stop_visibility())
        self._apply(effects)
        # Leave a third of the time for the deletes and returns that closing produces.
        closing = loop.create_task(self._channel.aclose(timeout=max(0.5, (deadline - loop.time()) * 2 / 3)))
        polls_end = deadline - min(_AFTER_POLLS, self.config.shutdown_timeout / 4)
        _, polling = await asyncio.wait(receivers, timeout=max(0.0, polls_end - loop.time()))
        if polling:
            log.warning("%d long poll(s) broken off at the shutdown deadline: messages SQS handed them "
                        "come back after their visibility timeout", len(polling))
            assert self._receive_sqs is not None
            self._receive_sqs.abort()
            await asyncio.wait(polling, timeout=1.0)
        await closing
        # Anything the channel did not report (it broke, or ran out of time) goes back too.
        effects = _Effects()
        visibility = self._stop_visibility()
        for held in list(self._ledger):  # in receipt order: a FIFO group's head first
            if held.stage is not Stage.DELETING:
                held.run.live = False
                self._ledger.release(held.message.ack_id)
                effects.give_back(held, visibility)
        self._apply(effects)
        extender.cancel()  # only now: the channel's final deliveries were kept invisible
        finished = await self._deleter.close(max(0.5, deadline - loop.time()))
        finished &= await self._visibility.close(max(0.5, deadline - loop.time()))
        for client in (self._sqs, self._receive_sqs):
            if client is not None:
                client.close()
        c = self.counters
        log.info(
            "stopped: received %d, acked %d, deleted %d, retried %d, returned %d, rejected %d%s",
            c.get("received"), c.get("acked"), c.get("deleted"), c.get("retried"), c.get("returned"),
            c.get("rejected"),
            "" if finished else " (some deletes were cut short: those messages will be redelivered)",
        )

    # -- receive --------------------------------------------------------------------------

    async def _reserve(self, n: int, beat: Callable[[], None] = lambda: None) -> bool:
        """Wait until ``n`` more messages fit below ``max_in_flight`` and the circuit is closed;
        False when stopping."""
        ledger = self._ledger
        while not ledger.fits(n) or self._circuit_holds_receiving():
            if self._stopping:
                return False
            await self._wait_for_room(0.5)
            beat()
        if self._stopping:
            return False
        ledger.reserve(n)
        return True

    def _stop_visibility(self) -> int:
        """The visibility of what a stop gives back: 0 once no long poll can still be in flight,
        this process's or those of the processes the supervisor stopped with it (they end within
        a poll's wait of the stop); until then, long enough for them to have ended. Visible at
        once, SQS would hand a message to one stopping poll after another, a receive count each
        time (seen: 3-4 receives during one stop, healthy messages in a DLQ at maxReceiveCount 2)."""
        assert self._loop is not None
        left = max(self._polls_end, self._stopped_at + self._poll_wait) - self._loop.time()
        return math.ceil(left) + 1 if left > 0 else 0

    def _circuit_holds_receiving(self) -> bool:
        """While the circuit is open, receiving waits, one receive at a time excepted when:
        nothing is left to probe the channel with (else an open circuit with nothing parked
        would never close), or every parked run was probed since the last new messages and
        none got through. Messages the sink refuses alike because of themselves (poison, the
        last ones on the queue) look like a broken sink; a new message lets the sink show it
        works. In a real outage this brings at most one batch per round of probes."""
        if not self._circuit.is_open:
            return False
        if self._receiving:
            return True
        if not any(h.stage is not Stage.DELETING for h in self._ledger):
            return False
        return self._probes_since_receive <= len(self._parked)

    def _wedged(self) -> str:
        """A reason when the circuit has been open for long with nothing to probe with and no
        receive under way (cannot happen: ``_circuit_holds_receiving``; a failed heartbeat if
        it ever does, so that the supervisor replaces the worker)."""
        now = time.monotonic()
        if self._circuit.is_open and not self._receiving and not self._parked and not self._timers \
                and not self._stopping and not any(h.stage is Stage.DELIVERING for h in self._ledger):
            self._wedged_since = self._wedged_since or now
            if now - self._wedged_since > _WEDGE_AFTER:
                return f"the circuit has been open for {now - self._wedged_since:.0f}s with nothing to probe with"
        else:
            self._wedged_since = 0.0
        return ""

    async def _wait_for_room(self, timeout: float) -> None:
        assert self._loop is not None
        future: asyncio.Future[None] = self._loop.create_future()
        self._room_waiters.append(future)
        timer = self._loop.call_later(timeout, _resolve, future)
        try:
            await future
        finally:
            timer.cancel()

    def _wake_receivers(self) -> None:
        waiters, self._room_waiters = self._room_waiters, []
        for future in waiters:
            _resolve(future)

    async def _receive_loop(self, index: int) -> None:
        config = self.config
        name = f"receiver-{index}"
        # A long poll is bounded by its wait plus the client's deadline; backoff caps at 20 s.
        beat = self._watchdog.register(name, config.wait_time + _LOOP_LIMIT)
        sqs = self._receive_sqs
        assert sqs is not None
        failures = 0
        wait_time = config.wait_time
        try:
            while not self._stopping:
                if not await self._reserve(config.batch_size, beat):
                    break
                beat()
                asked = self._take_budget(config.batch_size)
                if not asked:  # --max-messages reached: this receiver is done
                    self._ledger.unreserve(config.batch_size)
                    break
                self._receiving += 1
                self._polls_end = max(self._polls_end, self._loop.time() + wait_time)  # type: ignore[union-attr]
                self._poll_wait = wait_time
                started = time.monotonic()
                try:
                    raw = await sqs.receive(
                        max_messages=asked,
                        wait_time=wait_time,
                        visibility_timeout=config.visibility_timeout,
                    )
                except Exception as exc:  # SqsError, a credential refresh error, a bug: retry
                    self._ledger.unreserve(config.batch_size)
                    self._give_back_budget(asked)
                    if self._stopping:
                        break
                    failures += 1
                    if isinstance(exc, SqsError) and not exc.retryable and not self._refused[0]:
                        self._refused = (str(exc), time.monotonic())
                    self.counters.add("receive_errors")
                    self._receive_log.hit(_describe(exc))
                    await self._sleep(backoff(failures, base=0.5, cap=20.0))
                    continue
                finally:
                    self._receiving -= 1
                self.counters.observe("receive", time.monotonic() - started)
                failures = 0
                self._refused = ("", 0.0)
                self._give_back_budget(asked - len(raw))
                self._empty_receives = 0 if raw else self._empty_receives + 1
                if config.until_empty:  # drained soon: a stop must not wait a whole long poll
                    wait_time = config.wait_time if raw else min(config.wait_time, _DRAINING_WAIT)
                beat()
                self._hand_over(raw)
        finally:
            self._watchdog.unregister(name)

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake up for a stop."""
        assert self._stop_event is not None
        try:
            await asyncio.wait_for(self._stop_event.wait(), seconds)
        except TimeoutError:
            pass

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
        ledger = self._ledger
        ledger.unreserve(self.config.batch_size - len(messages))
        if not messages:
            self._room_changed()
            return
        self.counters.add("received", len(messages))
        now = time.monotonic()
        if self._stopping:  # a long poll that ended after the stop: give it all back
            visibility = self._stop_visibility()
            ledger.unreserve(len(messages))
            self.counters.add("returned", len(messages))
            self._visibility.give_back([(m.ack_id, m.group_id) for m in messages], visibility)
            log.info("returned %d message(s) a long poll brought after the stop (visible in %d s, when "
                     "the polls in flight have ended)", len(messages), visibility)
            return
        self._probes_since_receive = 0
        for run in _runs_of(messages, now + self._timeout, now):
            run.entries = [held for held in run.entries if ledger.add(held)]
            if run.entries:
                self._publish(run)

    # -- delivery -------------------------------------------------------------------------

    def _publish(self, run: Run) -> None:
        """Hand the run's next window to the channel: now, after the pacing of ``--max-rate``,
        or once the circuit closes."""
        if not run.live:
            return
        if self._circuit.is_open and not run.probe:
            self._park(run)
            return
        window = len(run.entries) if len(run.entries) == 1 or self._keeps_order() else 1
        if self._rate:
            assert self._loop is not None
            now = self._loop.time()
            start = max(now, self._rate_next)
            self._rate_next = start + window / self._rate
            if start > now + 0.001:
                self._schedule(run, start, paced=True)
                return
        self._dispatch(run, window)

    def _keeps_order(self) -> bool:
        return bool(self._channel is not None and self._channel.keeps_order)

    def _dispatch(self, run: Run, window: int) -> None:
        run.attempt += 1
        run.window = run.unreported = window
        now = time.monotonic()
        for i, held in enumerate(run.entries):
            if i < window:
                held.stage, held.attempt_started, held.outcome, held.reason = Stage.DELIVERING, now, None, ""
            else:
                held.stage = Stage.WAITING
        assert self._channel is not None
        messages = [held.message for held in run.entries[:window]]
        self._publishing = True
        try:
            self._channel.publish(messages, self._report)
        except Exception as exc:  # the channel is broken: restart the process, lose nothing
            self.fail(f"channel failed: {_describe(exc)}")
        finally:
            self._publishing = False

    def _report(self, message: Message, outcome: Outcome, reason: str, retry_after: float = 0.0) -> None:
        """What channels call with each verdict (``channels.base.Report``), from any thread.

        One bound method for every publish, not a closure per run: the ledger knows each
        message's run."""
        if threading.get_ident() != self._loop_thread:  # a channel's own thread (Kafka's poller)
            self._loop.call_soon_threadsafe(self._on_report, message, outcome, reason, retry_after)  # type: ignore[union-attr]
        elif self._publishing:  # from within publish: decide once publish has returned
            self._loop.call_soon(self._on_report, message, outcome, reason, retry_after)  # type: ignore[union-attr]
        else:
            self._on_report(message, outcome, reason, retry_after)

    def _on_report(self, message: Message, outcome: Outcome, reason: str, retry_after: float = 0.0) -> None:
        """The channel's verdict on one message of a run's window; on the loop."""
        held = self._ledger.get(message.ack_id)
        if held is None or held.message is not message or held.stage is not Stage.DELIVERING:
            return  # an attempt given up (returned), not ours, or not out: ignored
        if held.outcome is not None:
            return  # reported twice: the first verdict stands
        run = held.run
        self.counters.observe("publish", time.monotonic() - held.attempt_started)
        if outcome is Outcome.ACK and len(run.entries) == 1 and not self._circuit.is_open:
            # The common case, without the general bookkeeping: one message, delivered.
            held.outcome, held.stage, run.live = outcome, Stage.DELETING, False
            self._circuit.success()
            self.counters.add("acked")
            self._deleter.add(message.ack_id)
            return
        held.outcome, held.reason, held.retry_after = outcome, reason, retry_after
        run.unreported -= 1
        if run.unreported:
            return
        self._apply(self._settle(run))

    def _settle(self, run: Run) -> _Effects:
        """Every message of the run's window is reported: decide, in order."""
        effects = _Effects()
        now = time.monotonic()
        answered = False
        failed_at = -1
        # Whatever the outcome, this attempt was the probe: the run's next ones are not.
        was_probe, run.probe = run.probe, False
        for i, held in enumerate(run.entries[:run.window]):
            if held.outcome is Outcome.ACK:
                held.stage = Stage.DELETING
                effects.deletes.append(held.message.ack_id)
                answered = True
            elif held.outcome is Outcome.REJECT:  # to the DLQ; the rest of its group goes on
                self._ledger.release(held.message.ack_id)
                effects.rejected.append(held)
                answered = True
            else:
                failed_at = i  # this and everything after it goes again, in order
                break
        if answered and self._circuit.success():
            self._close_circuit(now)
        if failed_at < 0:
            run.entries = run.entries[run.window:]
            if run.entries:
                self._publish(run)  # the group's next message(s)
            else:
                run.live = False
            self._room_changed()
            return effects
        # A message acked after the failed one (a channel that keeps order) was never queued for
        # its delete: it goes again, after the failed one.
        run.entries = run.entries[failed_at:]
        first = run.entries[0]
        reason, wait = first.reason, first.retry_after
        if wait > RETRY_AFTER_CAP:
            self._retry_after_log.hit(f"{wait:g} s ({reason})")
            wait = RETRY_AFTER_CAP
        opened = self._circuit.failure(now, reason, wait=wait)
        if was_probe:
            self._circuit.probe_failed(now, wait=wait)
        if opened:
            log.warning("circuit open: %d deliveries failed in a row (last: %s); receiving paused, "
                        "%d held message(s) kept and retried in place",
                        self._circuit.threshold, reason, len(self._ledger))
            self.counters.set("circuit_open", 1)
            # Not from within this verdict: the shed requests' verdicts come back through it.
            self._loop.call_soon(self._shed)  # type: ignore[union-attr]
        if self._stopping:
            self._return_run(run, effects, visibility=self._stop_visibility())
        elif self._circuit.is_open:
            self._park(run)  # a failed probe goes to the back: the next probe tries another run
        else:
            run.failures += 1
            if run.failures > self.config.retries:
                self._return_run(run, effects)
            else:
                self.counters.add("retried", len(run.entries))
                self._retry_log.hit(reason)
                delay = max(wait, backoff(run.failures, base=self.config.retry_backoff_base,
                                          cap=self.config.retry_backoff_max))
                assert self._loop is not None
                self._schedule(run, self._loop.time() + delay)
        self._room_changed()
        return effects

    def _shed(self) -> None:
        """The circuit is open: what the channel has not sent yet is parked, not sent into the
        outage (else every request queued behind the in-flight limit becomes a duplicate)."""
        if self._circuit.is_open and self._channel is not None:
            self._channel.shed()

    def _close_circuit(self, now: float) -> None:
        """The channel delivers again; everything parked goes out now."""
        log.warning("circuit closed after %.0fs: the channel delivers again; receiving resumes, "
                    "%d parked run(s) sent again", now - self._circuit.opened_at, len(self._parked))
        self.counters.set("circuit_open", 0)
        if self._probe_timer is not None:
            self._probe_timer.cancel()
            self._probe_timer = None
        assert self._loop is not None
        while self._parked:
            self._schedule(self._parked.popleft(), self._loop.time())
        self._wake_receivers()

    def _park(self, run: Run) -> None:
        for held in run.entries:
            held.stage = Stage.WAITING
        self._parked.append(run)
        self._arm_probe()

    def _arm_probe(self) -> None:
        """One probe at a time, when the circuit's backoff says so."""
        if self._probe_timer is not None or not self._parked or self._stopping:
            return
        assert self._loop is not None
        delay = max(0.0, self._circuit.next_probe_at - time.monotonic())
        self._probe_timer = self._loop.call_later(delay, self._probe)

    def _probe(self) -> None:
        self._probe_timer = None
        if not self._circuit.is_open:
            return
        if not self._parked or not self._circuit.take_probe(time.monotonic()):
            self._arm_probe()
            return
        run = self._parked.popleft()
        run.probe = True
        self._probes_since_receive += 1
        log.info("circuit open: probing the channel with message %s", run.entries[0].message.id)
        self._publish(run)
        self._arm_probe()  # re-armed for after this probe (take_probe refuses meanwhile)

    def _schedule(self, run: Run, at: float, *, paced: bool = False) -> None:
        """Publish the run at loop time ``at``: a retry, or (``paced``) its turn under ``--max-rate``."""
        run.paced = paced
        for held in run.entries:
            held.stage = Stage.WAITING
        assert self._loop is not None
        previous = self._timers.pop(run, None)
        if previous is not None:
            previous.cancel()
        self._timers[run] = self._loop.call_at(at, self._due, run)

    def _due(self, run: Run) -> None:
        if self._timers.pop(run, None) is None or not run.live:
            return
        if not run.paced or (self._circuit.is_open and not run.probe):
            self._publish(run)  # a retry: the circuit and the pacing have their say
            return
        run.paced = False
        self._dispatch(run, len(run.entries) if len(run.entries) == 1 or self._keeps_order() else 1)

    def _return_run(self, run: Run, effects: _Effects, *, visibility: int | None = None) -> None:
        """Give the run's messages back to SQS, undelivered: with one visibility (the longest of
        theirs) and head first, so that no later message of a FIFO group is visible before it."""
        run.live = False
        returned = [held for held in run.entries if held.stage is not Stage.DELETING]
        if not returned:
            return
        if visibility is None:
            visibility = max(self._return_visibility(held) for held in returned)
        for held in returned:
            self._ledger.release(held.message.ack_id)
            effects.give_back(held, visibility)
            effects.returned_because = held.reason or effects.returned_because

    def _return_visibility(self, held: Held) -> int:
        try:
            receive_count = int(held.message.attributes.get("ApproximateReceiveCount", "1") or 1)
        except ValueError:
            receive_count = 1
        return nack_visibility(receive_count, base=self.config.nack_backoff, cap=self.config.nack_backoff_max)

    def _apply(self, effects: _Effects) -> None:
        """Carry out what a decision asked for."""
        if effects.deletes:
            self.counters.add("acked", len(effects.deletes))
            for handle in effects.deletes:
                self._deleter.add(handle)
        for visibility, handles in effects.returns.items():
            self.counters.add("returned", len(handles))
            self._visibility.give_back(handles, visibility)
        if effects.returns and effects.returned_because:
            self._returned_log.hit(effects.returned_because)
        for held in effects.rejected:
            self.counters.add("rejected")
            log.warning("rejected message %s: %s; left to the queue's redrive policy", held.message.id, held.reason)

    # -- visibility -----------------------------------------------------------------------

    async def _extend_loop(self) -> None:
        """Extend every held message before its visibility ends; give up overlong attempts."""
        timeout = self._timeout
        tick = min(5.0, max(0.25, timeout / 4))
        beat = self._watchdog.register("extender", _LOOP_LIMIT)
        try:
            while True:
                await asyncio.sleep(tick)
                beat()
                now = time.monotonic()
                due, at_limit = (self._ledger.due_for_extension(now, timeout / 2, timeout)
                                 if timeout > 0 else ([], []))
                if due:
                    self._visibility.extend([(h.message.ack_id, h.message.group_id) for h in due], timeout)
                if at_limit:
                    self._give_back_at_limit(at_limit)
                for run in self._ledger.overdue_runs(now, self.config.max_processing_time):
                    self._give_up_attempt(run, now)
        finally:
            self._watchdog.unregister("extender")

    def _give_up_attempt(self, run: Run, now: float) -> None:
        """A delivery attempt held the run longer than ``max_processing_time``: what was not
        reported failed, and is decided as any failure (``_settle``): a circuit failure, retried
        in place or returned, parked while the circuit is open, a probe's failure if it was one.
        The channel's own deadline is shorter (``WorkerConfig``), so this catches a channel that
        broke its contract; a report of the given-up attempt that comes later is ignored."""
        if not run.live or not any(h.stage is Stage.DELIVERING for h in run.entries):
            return
        reason = (f"one delivery attempt held it for over {self.config.max_processing_time:g}s "
                  "(--max-processing-time)")
        for held in run.entries[:run.window]:
            if held.outcome is None:
                held.outcome, held.reason, held.retry_after = Outcome.RETRY, reason, 0.0
        run.unreported = 0
        self._give_up_log.hit(f"message {run.entries[0].message.id}: {reason}")
        self._apply(self._settle(run))

    def _give_back_at_limit(self, at_limit: list[Held]) -> None:
        """SQS refuses to keep a message invisible longer than 12 hours after its receive: give
        its run back now (it would be visible again soon anyway), rather than fail an extension
        on every tick. A delete under way is left to finish."""
        effects = _Effects()
        for run in {id(h.run): h.run for h in at_limit if h.stage is not Stage.DELETING}.values():
            if not run.live:
                continue
            timer = self._timers.pop(run, None)
            if timer is not None:
                timer.cancel()
            if run in self._parked:
                self._parked.remove(run)
            if run.probe:  # the probe out: the next one may go
                run.probe = False
                self._circuit.probe_failed(time.monotonic())
                self._arm_probe()
            self._return_run(run, effects, visibility=0)
            self._limit_log.hit(f"message {run.entries[0].message.id}")
        self._apply(effects)
        self._room_changed()

    def _still_held(self, handles: Sequence[str]) -> set[str]:
        return {handle for handle in handles if self._ledger.get(handle) is not None}

    def _extension_failed(self, handles: list[str]) -> None:
        self._ledger.extension_failed(handles, time.monotonic())

    def _visibility_lost(self, handles: list[str]) -> None:
        for handle in handles:  # visible again already: extending it further is pointless
            held = self._ledger.get(handle)
            if held is not None:
                held.visible_until = math.inf

    # -- bookkeeping ----------------------------------------------------------------------

    def _forget(self, handles: Sequence[str]) -> None:
        """Deleted (or the delete failed for good): no longer ours to hold."""
        for handle in handles:
            self._ledger.release(handle)
        self._room_changed()

    def _room_changed(self) -> None:
        if self._room_waiters and self._ledger.fits(self.config.batch_size):
            self._wake_receivers()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _runs_of(messages: list[Message], visible_until: float, received_at: float) -> list[Run]:
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


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, SqsError) else f"{type(exc).__name__}: {exc}"


def worker_main(slot: int, config: WorkerConfig, shared_stats: MutableSequence[int],
                parent_pid: int, heartbeat: Any = None, budget: Any = None) -> None:
    """Entry point of a spawned worker process. ``heartbeat``: a shared double the worker sets
    to ``time.monotonic()`` while healthy (the clock is system-wide on Linux); ``budget``: the
    shared count of messages the poller may still receive (--max-messages), or None."""
    import uvloop  # measured: ~3x less CPU per request than asyncio's own loop here

    setup_logging(config.log_level, config.log_format)
    counters = Counters()

    def beat() -> None:
        if heartbeat is not None:
            heartbeat.value = time.monotonic()

    try:
        worker = Worker(config, counters, heartbeat=beat, budget=budget)
    except Exception as exc:  # no credentials yet (a failing refresh): the supervisor retries
        log.error("worker cannot start: %s", _describe(exc))
        raise SystemExit(EXIT_FAILED) from None

    def on_thread_error(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        worker.fail_threadsafe(f"thread {args.thread.name if args.thread else '?'} died: "
                               f"{args.exc_type.__name__}: {args.exc_value}")

    threading.excepthook = on_thread_error

    def tick() -> None:
        counters.copy_to(shared_stats)
        if os.getppid() != parent_pid:
            log.warning("the supervisor is gone; stopping")
            worker.stop()

    async def main() -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, worker.stop)
        loop.set_exception_handler(_log_loop_error)
        return await worker.run(tick)

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            code = runner.run(main())
    except Exception as exc:  # one line, not a traceback; the supervisor restarts us
        log.error("worker failed: %s", _describe(exc), exc_info=log.isEnabledFor(logging.DEBUG))
        code = EXIT_FAILED
    raise SystemExit(code)


def _log_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Errors the loop could not hand to anyone (a callback's, a transport's): one line."""
    exc = context.get("exception")
    detail = f"{type(exc).__name__}: {exc}" if exc is not None else ""
    log.warning("event loop: %s%s", context.get("message", "error"), f" ({detail})" if detail else "")
