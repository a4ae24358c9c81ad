"""One worker process: receive from SQS, publish to the channel, delete what was acknowledged.

Everything runs on one event loop (uvloop), on the process's main thread, in parts with one job
each, wired together here once the channel has started:

- ``poller.receiver``: ``--receivers`` long polls, each reserving room for a batch first.
- ``poller.dispatcher``: runs, the FIFO sequencer, pacing, the channel's reports, and
  ``settle``, the one place where an ack or a nack is decided.
- ``poller.gate``: the circuit (``poller.circuit``) with the runs it parks and its probes: after
  ``--circuit-threshold`` failed deliveries in a row receiving stops, held messages stay
  invisible and one probe at a time tries the channel, so an outage costs no receive counts.
- ``poller.acker``: deletes (``poller.deleter``), returns and extensions (``poller.visibility``).
- ``poller.ledger``: every message from its receipt until its delete returned, it was given
  back or rejected; all that time it counts against ``--max-in-flight`` and is extended.

This module runs the process: it starts the channel, runs the tasks (receivers, the extender,
the heartbeat), tells the supervisor it is alive once a second while every loop beats
(``poller.watchdog``), the channel is not stalled and the loop itself is free, and stops.

Shutdown (SIGTERM / SIGINT), within ``shutdown_timeout``: stop receiving, give back what waits for
a retry, let the channel finish or give back what it holds (``aclose``), give back the rest,
flush the deletes of everything acknowledged, exit 0. Long polls in progress are let finish
(within ``--wait-time``), because SQS still hands messages to a poll until it returns: one broken
off would leave them invisible for the visibility timeout. What the stop gives back (and what
those polls bring) is visible again once every poll in flight has ended
(``Polls.stop_visibility``). The extender runs until the channel has closed.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Coroutine, MutableSequence
from dataclasses import dataclass
from typing import Any, Protocol

# Measured: ~3x less CPU per request than asyncio's own loop here. Imported with the module, so
# that the supervisor has it before it forks the workers (poller.supervisor).
import uvloop

from channels.base import Channel, ChannelError
from poller.acker import Acker
from poller.circuit import Circuit
from poller.config import WorkerConfig
from poller.deleter import Deleter
from poller.dispatcher import Dispatcher, Pacing, RetryPolicy
from poller.exits import EXIT_BOOT, EXIT_FAILED, EXIT_OK
from poller.gate import Gate
from poller.ledger import Ledger, Room
from poller.logs import setup_logging
from poller.receiver import LOOP_LIMIT, Budget, Polls, Receiver, SharedCount
from poller.sqs import SqsClient, error_text, load_credentials
from poller.stats import Counters
from poller.visibility import VisibilityLanes
from poller.watchdog import Watchdog

__all__ = ["Worker", "worker_main"]

# At shutdown, this much of the deadline is kept for what comes after the long polls.
_AFTER_POLLS = 2.0
# The circuit is open, nothing is left to probe with and no receive brings one: never for long.
_WEDGE_AFTER = 30.0

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Parts:
    """A running worker's parts, built on the loop once the channel started."""

    channel: Channel
    ledger: Ledger
    receiver: Receiver
    dispatcher: Dispatcher
    acker: Acker
    polls: Polls
    deleter: Deleter
    lanes: VisibilityLanes
    sqs: SqsClient  # deletes and visibility changes
    receive_sqs: SqsClient  # long polls: aborted at shutdown


class Worker:
    def __init__(self, config: WorkerConfig, counters: Counters | None = None, *,
                 heartbeat: Callable[[], None] | None = None, budget: SharedCount | None = None) -> None:
        self.config = config
        self.counters = counters or Counters()
        self._heartbeat = heartbeat
        self._budget = Budget(budget)  # --max-messages: a count shared by the workers
        self._credentials = load_credentials(config.target)
        self._watchdog = Watchdog()
        self._clock = time.monotonic  # the one clock of every part of this worker
        self._parts: _Parts | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._stopping = False
        self._failed = False  # the channel or a task broke: exit non-zero, the supervisor restarts us
        self._stall_logged = ""

    # -- lifecycle ------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask for a graceful stop. From the loop (signal handlers are installed on it)."""
        self._stopping = True
        if self._parts is not None:
            self._parts.receiver.stop()
            self._parts.dispatcher.stop()
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
        self._stop_event = asyncio.Event()
        channel = config.channel.create(config.target.queue_url)
        try:
            await asyncio.to_thread(channel.start)  # may block (Kafka checks the broker)
        except ChannelError as exc:
            log.error("channel %s cannot start: %s", config.channel.name, exc)
            return EXIT_BOOT
        self._parts = parts = self._assemble(channel, loop)
        if self._stopping:  # a signal while the channel started
            self.stop()
        receivers = [self._task(parts.receiver.run(i), f"receiver-{i}") for i in range(config.receive_ceiling)]
        extender = self._task(self._extend_loop(parts), "extender")
        health = self._task(self._health_loop(tick), "heartbeat")
        more = config.receive_ceiling - config.receivers
        log.info(
            "worker started: long polls %d%s, batch %d, wait %ds, max in flight %d, channel %s",
            config.receivers, f" (up to {more} more while SQS's round trip calls for them)" if more else "",
            config.batch_size, config.wait_time, config.max_in_flight,
            config.channel.name,
        )
        self._check_health()  # the first heartbeat: the supervisor knows the channel started
        await self._stop_event.wait()
        await self._shutdown(parts, receivers, extender)
        health.cancel()
        if tick is not None:
            tick()
        return EXIT_FAILED if self._failed else EXIT_OK

    def _assemble(self, channel: Channel, loop: asyncio.AbstractEventLoop) -> _Parts:
        config, counters, clock = self.config, self.counters, self._clock
        timeout = config.effective_visibility_timeout
        lanes_count = max(2, min(16, -(-config.max_in_flight // 500)))
        sqs = SqsClient(config.target, credentials=self._credentials, connections=lanes_count + 32)
        receive_sqs = SqsClient(config.target, credentials=self._credentials, connections=config.receive_ceiling)
        ledger = Ledger(config.max_in_flight)
        room = Room(ledger, config.batch_size, loop)
        gate = Gate(Circuit(threshold=config.circuit_threshold), ledger)
        polls = Polls(config.wait_time, clock)
        lanes = VisibilityLanes(
            sqs, lanes=lanes_count, still_held=ledger.still_held, extension_failed=ledger.extension_failed,
            visibility_lost=ledger.visibility_lost, counters=counters,
        )
        deleter = Deleter(sqs, linger=config.delete_linger, visibility_timeout=timeout,
                          done=lambda handles: acker.deleted(handles), counters=counters, loop=loop)
        acker = Acker(ledger=ledger, room=room, deletes=deleter, visibility=lanes, counters=counters,
                      nack_base=config.nack_backoff, nack_cap=config.nack_backoff_max)
        dispatcher = Dispatcher(
            channel=channel, ledger=ledger, room=room, gate=gate, acker=acker, counters=counters, loop=loop,
            clock=clock, fail=self.fail, stop_visibility=polls.stop_visibility, visibility_timeout=timeout,
            retry=RetryPolicy(config.retries, config.retry_backoff_base, config.retry_backoff_max),
            pacing=Pacing(config.max_rate),
        )
        receiver = Receiver(config, sqs=receive_sqs, ledger=ledger, room=room, gate=gate, polls=polls,
                            budget=self._budget, hand_over=dispatcher.hand_over, counters=counters,
                            watchdog=self._watchdog, clock=clock)
        return _Parts(channel, ledger, receiver, dispatcher, acker, polls, deleter, lanes, sqs, receive_sqs)

    def _task(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """A long-lived task: an exception escaping it restarts the worker. SQS's and the
        channel's errors are handled where they happen, so what escapes is a bug: logged with
        its traceback."""
        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("%s failed", name, exc_info=True)
                self.fail(f"{name} failed: {type(exc).__name__}: {exc}")

        return asyncio.get_running_loop().create_task(guarded(), name=name)

    async def _health_loop(self, tick: Callable[[], None] | None) -> None:
        while True:
            await asyncio.sleep(1.0)
            self._check_health()
            if tick is not None:
                tick()

    def _check_health(self) -> None:
        """Heartbeat only while every loop beats, the channel is not stalled, the circuit is
        not wedged and receiving is not refused for good; the loop itself being free to run
        this is the rest of the proof."""
        parts = self._parts
        if parts is None:
            return
        problems = self._watchdog.late()
        for problem in (parts.channel.stalled(),
                        parts.dispatcher.wedged(receiving=parts.polls.in_flight > 0, limit=_WEDGE_AFTER),
                        parts.receiver.refused()):
            if problem:
                problems.append(problem)
        self.counters.set("in_flight", len(parts.ledger))
        self.counters.set("receivers", parts.receiver.window.limit)
        self.counters.set("drained", int(parts.receiver.drained()))
        # The supervisor's autoscaler compares it a few seconds apart: how much of a core we use.
        self.counters.set("cpu_ms", int(time.process_time() * 1000))
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

    async def _extend_loop(self, parts: _Parts) -> None:
        """Extend every held message before its visibility ends; give up overlong attempts."""
        timeout = self.config.effective_visibility_timeout
        tick = min(5.0, max(0.25, timeout / 4))
        beat = self._watchdog.register("extender", LOOP_LIMIT)
        try:
            while True:
                await asyncio.sleep(tick)
                beat()
                now = self._clock()
                if timeout > 0:
                    due, at_limit = parts.ledger.due_for_extension(now, timeout / 2, timeout)
                    parts.acker.extend(due, timeout)
                    if at_limit:
                        parts.dispatcher.give_back_at_limit(at_limit)
                parts.dispatcher.give_up_overdue(now, self.config.max_processing_time)
        finally:
            self._watchdog.unregister("extender")

    async def _shutdown(self, parts: _Parts, receivers: list[asyncio.Task[None]],
                        extender: asyncio.Task[None]) -> None:
        """The receivers and the dispatcher were stopped (``stop``): what waits went back."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.shutdown_timeout
        parts.deleter.deadline = deadline
        log.info("stopping: %d message(s) held, %d long poll(s) in flight", len(parts.ledger),
                 parts.polls.in_flight)
        # Leave a third of the time for the deletes and returns that closing produces.
        closing = loop.create_task(parts.channel.aclose(timeout=max(0.5, (deadline - loop.time()) * 2 / 3)))
        polls_end = deadline - min(_AFTER_POLLS, self.config.shutdown_timeout / 4)
        _, polling = await asyncio.wait(receivers, timeout=max(0.0, polls_end - loop.time()))
        if polling:
            log.warning("%d long poll(s) broken off at the shutdown deadline: messages SQS handed them "
                        "come back after their visibility timeout", len(polling))
            parts.receive_sqs.abort()
            await asyncio.wait(polling, timeout=1.0)
        await closing
        parts.dispatcher.give_back_all()  # what the channel did not report (it broke, or ran out of time)
        extender.cancel()  # only now: the channel's final deliveries were kept invisible
        finished = await parts.deleter.close(max(0.5, deadline - loop.time()))
        finished &= await parts.lanes.close(max(0.5, deadline - loop.time()))
        parts.sqs.close()
        parts.receive_sqs.close()
        c = self.counters
        log.info(
            "stopped: received %d, acked %d, deleted %d, retried %d, returned %d, rejected %d%s",
            c.get("received"), c.get("acked"), c.get("deleted"), c.get("retried"), c.get("returned"),
            c.get("rejected"),
            "" if finished else " (some deletes were cut short: those messages will be redelivered)",
        )


class SharedClock(Protocol):
    """A ``multiprocessing.Value('d')``: the time of this worker's last heartbeat."""

    value: float


def worker_main(slot: int, config: WorkerConfig, shared_stats: MutableSequence[int],
                parent_pid: int, heartbeat: SharedClock | None = None, budget: SharedCount | None = None) -> None:
    """Entry point of a spawned worker process. ``heartbeat``: a shared double the worker sets
    to ``time.monotonic()`` while healthy (the clock is system-wide on Linux); ``budget``: the
    shared count of messages the poller may still receive (--max-messages), or None."""
    setup_logging(config.log_level, config.log_format)
    counters = Counters()

    def beat() -> None:
        if heartbeat is not None:
            heartbeat.value = time.monotonic()

    try:
        worker = Worker(config, counters, heartbeat=beat, budget=budget)
    except Exception as exc:  # noqa: BLE001 - no credentials yet (a failing refresh): the supervisor retries
        log.error("worker cannot start: %s", error_text(exc))
        raise SystemExit(EXIT_FAILED) from None

    def on_thread_error(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        worker.fail_threadsafe(f"thread {args.thread.name if args.thread else '?'} died: "
                               f"{args.exc_type.__name__}: {args.exc_value}")

    threading.excepthook = on_thread_error

    orphaned = False

    def tick() -> None:
        nonlocal orphaned
        counters.copy_to(shared_stats)
        if os.getppid() != parent_pid and not orphaned:
            orphaned = True  # once: the ticks go on while the stop drains
            log.warning("the supervisor is gone; stopping")
            worker.stop()

    async def main() -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, worker.stop)
        loop.set_exception_handler(_log_loop_error)
        return await worker.run(tick)

    _tune_gc()
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            code = runner.run(main())
    except Exception as exc:  # one line, not a traceback; the supervisor restarts us
        log.error("worker failed: %s", error_text(exc), exc_info=log.isEnabledFor(logging.DEBUG))
        code = EXIT_FAILED
    raise SystemExit(code)


def _tune_gc() -> None:
    """The cycle collector, for a loop that makes a few dozen short-lived objects per message.

    With CPython's default first threshold (700 allocations) the young generation is collected
    every ~20 messages, and each collection walks the messages still held, which then get walked
    again in the older generations: ~3.5% of a worker's CPU in a profile (perf: ``gc_collect_main``,
    ``visit_*``, ``subtype_traverse``). With 20,000 (and 20 for the older generations, CPython's
    10) a collection comes every few hundred messages. Measured with interleaved drains of 20,000
    messages into the fast sink, 4 pairs: 134 -> 130 us/msg. What exists before the loop starts
    (modules, configuration) is frozen out of every collection (not measured on its own)."""
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def _log_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Errors the loop could not hand to anyone (a callback's, a transport's): one line."""
    exc = context.get("exception")
    detail = f"{type(exc).__name__}: {exc}" if exc is not None else ""
    log.warning("event loop: %s%s", context.get("message", "error"), f" ({detail})" if detail else "")
