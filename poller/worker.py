"""One worker process: receive from SQS, publish to the channel, delete what was acknowledged.

Threads of a worker:

- ``receivers`` long-poll ``ReceiveMessage`` each; a receiver first reserves room for a whole
  batch below ``max_in_flight``, so a slow channel pauses receiving and memory stays flat
  (dramatiq's bounded prefetch, Redpanda's ``max_outstanding_messages``).
- the channel's own threads report each message's outcome to ``Worker.report``:
  ACK -> the delete batcher, RETRY -> the nack batcher (visibility = backoff), REJECT -> logged,
  counted and left to the queue's redrive policy. Nothing is deleted without an ACK.
- the delete and nack batchers flush ``DeleteMessageBatch`` / ``ChangeMessageVisibilityBatch``
  calls of up to 10 entries.
- the extender pushes back the visibility timeout of messages the channel holds for long, so a
  slow sink does not cause redeliveries.
- the main thread waits for a stop signal, copies the counters out for the supervisor once a
  second, and stops when the supervisor is gone.

Shutdown (SIGTERM / SIGINT): stop receiving (a long poll in progress is broken off), let the
channel finish or give back what it holds (``close``), nack the undelivered with visibility 0 so
they come back at once, flush the deletes of everything acknowledged, exit 0.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, MutableSequence, Sequence
from typing import Any

from channels.base import Channel, ChannelError, Message, Outcome
from poller.backoff import backoff, nack_visibility
from poller.batcher import Batcher
from poller.config import WorkerConfig
from poller.logs import RateLimitedLog, setup_logging
from poller.sqs import SqsClient, SqsError, load_credentials
from poller.stats import Counters

__all__ = ["EXIT_BOOT", "EXIT_OK", "Worker", "worker_main"]

EXIT_OK = 0
EXIT_BOOT = 3  # the worker cannot start at all: the supervisor halts rather than respawn forever

_EXPIRED_CODES = frozenset({"ReceiptHandleIsInvalid", "InvalidReceiptHandle"})
_DELETE_ATTEMPTS = 4

log = logging.getLogger(__name__)


class Worker:
    def __init__(self, config: WorkerConfig, counters: Counters | None = None) -> None:
        self.config = config
        self.counters = counters or Counters()
        self._stopping = threading.Event()
        self._failed = False  # the channel broke: exit non-zero so the supervisor restarts us
        # A plain Lock (not the default RLock) and notify only when a receiver waits: report()
        # takes this once per message, on the hot path.
        self._cond = threading.Condition(threading.Lock())
        self._waiting = 0  # receivers waiting in _reserve
        self._reserved = 0  # in flight + reserved for receives under way
        self._in_flight: dict[str, float] = {}  # receipt handle -> when received (monotonic)
        self._receive_clients: list[SqsClient] = []
        self._credentials = load_credentials(config.target)
        self._channel: Channel | None = None
        self._deleter: Batcher[str] = Batcher(
            "deleter", self._make_delete_flush, threads=config.deleters, linger=config.delete_linger
        )
        self._nacker: Batcher[tuple[str, int]] = Batcher(
            "nacker", self._make_nack_flush, threads=1, linger=config.delete_linger
        )
        self._nack_log = RateLimitedLog(log, "nacked %d message(s) for a retry after backoff; last: %s")
        self._receive_log = RateLimitedLog(log, "%d ReceiveMessage call(s) failed, retrying; last: %s")

    # -- lifecycle ------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask for a graceful stop; safe from a signal handler (only sets an event)."""
        self._stopping.set()

    def run(self, tick: Callable[[], None] | None = None) -> int:
        config = self.config
        self._channel = config.channel.create(config.target.queue_url)
        try:
            self._channel.start()
        except ChannelError as exc:
            log.error("channel %s cannot start: %s", config.channel.name, exc)
            return EXIT_BOOT
        self._deleter.start()
        self._nacker.start()
        threads = [
            threading.Thread(target=self._receive_loop, name=f"receiver-{i}", daemon=True)
            for i in range(config.receivers)
        ]
        threads.append(threading.Thread(target=self._extend_loop, name="extender", daemon=True))
        for thread in threads:
            thread.start()
        log.info(
            "worker started: %d receivers, batch %d, wait %ds, max in flight %d, channel %s",
            config.receivers, config.batch_size, config.wait_time, config.max_in_flight,
            config.channel.name,
        )
        while not self._stopping.wait(1.0):
            if tick is not None:
                tick()
        self._shutdown(threads)
        if tick is not None:
            tick()
        return 1 if self._failed else EXIT_OK

    def _shutdown(self, threads: Sequence[threading.Thread]) -> None:
        deadline = time.monotonic() + self.config.shutdown_timeout
        held = self.counters.get("in_flight")
        log.info("stopping: %d message(s) in flight", held)
        with self._cond:
            self._cond.notify_all()
            clients = list(self._receive_clients)
        for client in clients:
            client.abort()
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        assert self._channel is not None
        # Leave a third of the time for the deletes and nacks that closing produces.
        self._channel.close(timeout=max(0.5, (deadline - time.monotonic()) * 2 / 3))
        finished = self._deleter.close(max(0.5, deadline - time.monotonic()))
        finished &= self._nacker.close(max(0.5, deadline - time.monotonic()))
        c = self.counters
        log.info(
            "stopped: received %d, acked %d, deleted %d, retried %d, rejected %d%s",
            c.get("received"), c.get("acked"), c.get("deleted"), c.get("retried"), c.get("rejected"),
            "" if finished else " (some deletes were cut short: those messages will be redelivered)",
        )

    # -- receive --------------------------------------------------------------------------

    def _reserve(self, n: int) -> bool:
        """Wait until ``n`` more messages fit below ``max_in_flight``; False when stopping."""
        limit = self.config.max_in_flight
        with self._cond:
            while self._reserved + n > limit:
                if self._stopping.is_set():
                    return False
                self._waiting += 1
                self._cond.wait(0.5)
                self._waiting -= 1
            if self._stopping.is_set():
                return False
            self._reserved += n
            return True

    def _receive_loop(self) -> None:
        config = self.config
        client = SqsClient(config.target, credentials=self._credentials)
        with self._cond:
            self._receive_clients.append(client)
        failures = 0
        try:
            while not self._stopping.is_set():
                if not self._reserve(config.batch_size):
                    break
                try:
                    raw = client.receive(
                        max_messages=config.batch_size,
                        wait_time=config.wait_time,
                        visibility_timeout=config.visibility_timeout,
                    )
                except Exception as exc:  # SqsError, or a bug: a receiver must not die silently
                    self._unreserve(config.batch_size)
                    if self._stopping.is_set():
                        break
                    failures += 1
                    self.counters.add("receive_errors")
                    self._receive_log.hit(str(exc) if isinstance(exc, SqsError) else repr(exc))
                    self._stopping.wait(backoff(failures, base=0.5, cap=20.0))
                    continue
                failures = 0
                self._hand_over(raw)
        finally:
            client.close()

    def _hand_over(self, raw: list[dict[str, Any]]) -> None:
        now = time.monotonic()
        batch = []
        for m in raw:
            try:
                batch.append(Message(
                    id=m["MessageId"],
                    body=m["Body"],
                    ack_id=m["ReceiptHandle"],
                    attributes=m.get("Attributes") or {},
                    message_attributes=m.get("MessageAttributes") or {},
                    md5_of_body=m.get("MD5OfBody", ""),
                ))
            except KeyError as exc:  # cannot happen with SQS; never crash the receiver over it
                log.error("skipping a malformed message from SQS (no %s); it will be redelivered", exc)
        with self._cond:
            self._reserved -= self.config.batch_size - len(batch)
            for message in batch:
                self._in_flight[message.ack_id] = now
            self.counters.set("in_flight", len(self._in_flight))
            self._cond.notify_all()
        if batch:
            self.counters.add("received", len(batch))
            assert self._channel is not None
            try:
                self._channel.publish(batch, self.report)
            except Exception as exc:  # the channel is broken: restart the process, lose nothing
                log.error("channel failed, restarting the worker: %s: %s", type(exc).__name__, exc)
                self._failed = True
                self.stop()

    def _unreserve(self, n: int) -> None:
        with self._cond:
            self._reserved -= n
            self._cond.notify_all()

    # -- outcomes -------------------------------------------------------------------------

    def report(self, message: Message, outcome: Outcome, reason: str) -> None:
        """The channel's verdict on one message; called from any thread, once per message."""
        with self._cond:
            if self._in_flight.pop(message.ack_id, None) is None:
                return  # reported twice: the first verdict stands
            self._reserved -= 1
            self.counters.set("in_flight", len(self._in_flight))
            if self._waiting:
                self._cond.notify()
        if outcome is Outcome.ACK:
            self.counters.add("acked")
            self._deleter.add(message.ack_id)
        elif outcome is Outcome.RETRY:
            self.counters.add("retried")
            if self._stopping.is_set():
                visibility = 0  # we are going away: let another poller take it now
            else:
                receive_count = int(message.attributes.get("ApproximateReceiveCount", "1") or 1)
                visibility = nack_visibility(
                    receive_count, base=self.config.nack_backoff_base, cap=self.config.nack_backoff_max
                )
            self._nacker.add((message.ack_id, visibility))
            self._nack_log.hit(reason)
        else:
            self.counters.add("rejected")
            log.warning("rejected message %s: %s; left to the queue's redrive policy", message.id, reason)

    # -- SQS batch calls (each batcher thread builds its own client) ------------------------

    def _make_delete_flush(self) -> Callable[[Sequence[str]], None]:
        client = SqsClient(self.config.target, credentials=self._credentials)

        def flush(handles: Sequence[str]) -> None:
            pending = list(handles)
            for attempt in range(1, _DELETE_ATTEMPTS + 1):
                try:
                    failures = client.delete_batch(pending)
                except SqsError as exc:
                    if not exc.retryable or attempt == _DELETE_ATTEMPTS:
                        self.counters.add("delete_failed", len(pending))
                        log.error("deleting %d message(s) failed, they will be redelivered: %s",
                                  len(pending), exc)
                        return
                    time.sleep(backoff(attempt, base=0.2, cap=5.0))
                    continue
                self.counters.add("deleted", len(pending) - len(failures))
                retry = []
                for failure in failures:
                    if failure.code in _EXPIRED_CODES or "expired" in failure.message.lower():
                        self.counters.add("expired")
                        log.warning("receipt handle expired before delete, the message will be "
                                    "redelivered: %s %s", failure.code, failure.message)
                    elif failure.sender_fault or attempt == _DELETE_ATTEMPTS:
                        self.counters.add("delete_failed")
                        log.error("delete failed, the message will be redelivered: %s %s",
                                  failure.code, failure.message)
                    else:
                        retry.append(pending[failure.index])
                if not retry:
                    return
                pending = retry
                time.sleep(backoff(attempt, base=0.2, cap=5.0))

        return flush

    def _make_nack_flush(self) -> Callable[[Sequence[tuple[str, int]]], None]:
        client = SqsClient(self.config.target, credentials=self._credentials)

        def flush(entries: Sequence[tuple[str, int]]) -> None:
            # A failed nack costs only time: the message comes back at its visibility timeout.
            try:
                failures = client.change_visibility_batch(entries)
            except SqsError as exc:
                log.warning("could not change visibility of %d message(s): %s", len(entries), exc)
                return
            for failure in failures:
                log.debug("visibility change failed: %s %s", failure.code, failure.message)

        return flush

    # -- visibility extension --------------------------------------------------------------

    def _extend_loop(self) -> None:
        """Extend the visibility of messages held longer than half their timeout."""
        timeout = self.config.effective_visibility_timeout
        if timeout <= 0:
            return
        client = SqsClient(self.config.target, credentials=self._credentials)
        interval = max(1.0, timeout / 3)
        try:
            while not self._stopping.wait(interval):
                cutoff = time.monotonic() - timeout / 2
                with self._cond:
                    old = [h for h, since in self._in_flight.items() if since < cutoff]
                for start in range(0, len(old), 10):
                    chunk = old[start:start + 10]
                    try:
                        client.change_visibility_batch([(h, timeout) for h in chunk])
                    except SqsError as exc:
                        log.warning("could not extend visibility of %d message(s): %s", len(chunk), exc)
                        continue
                    self.counters.add("extended", len(chunk))
                    now = time.monotonic()
                    with self._cond:
                        for handle in chunk:
                            if handle in self._in_flight:
                                self._in_flight[handle] = now
        finally:
            client.close()


def worker_main(slot: int, config: WorkerConfig, shared_stats: MutableSequence[int],
                parent_pid: int) -> None:
    """Entry point of a spawned worker process."""
    setup_logging(config.log_level)
    counters = Counters()
    worker = Worker(config, counters)

    def on_signal(signum: int, frame: object) -> None:
        worker.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def tick() -> None:
        counters.copy_to(shared_stats)
        if os.getppid() != parent_pid:
            log.warning("the supervisor is gone; stopping")
            worker.stop()

    try:
        code = worker.run(tick)
    except Exception as exc:  # one line, not a traceback; the supervisor restarts us
        log.error("worker failed: %s: %s", type(exc).__name__, exc, exc_info=log.isEnabledFor(logging.DEBUG))
        code = 1
    raise SystemExit(code)
