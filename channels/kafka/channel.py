"""The channel: one idempotent producer per worker process, its poll thread, and the settlement
of each message from its delivery report (see the package docstring)."""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import CancelledError
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from channels.base import Channel, ChannelError, Message, Outcome, Report
from channels.events import EventError
from channels.kafka.config import KafkaConfig, _error_text, _kafka_error, _message_timeout
from channels.kafka.msk import _MskToken, msk_oauth_callback
from channels.kafka.progress import ProducerProgress
from channels.kafka.records import Record, RecordBuilder
from channels.reports import LoopReports

__all__ = ["KafkaChannel"]

log = logging.getLogger("channels.kafka")

# Errors about the record itself: sending it again can never work.
_REJECT_CODES = frozenset(
    {KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_RECORD, KafkaError.INVALID_MSG,
     KafkaError.INVALID_MSG_SIZE, KafkaError.RECORD_LIST_TOO_LARGE, KafkaError.INVALID_TIMESTAMP,
     KafkaError._BAD_MSG, KafkaError._INVALID_ARG}
)
# Size errors the broker gives a whole record batch: the record may be fine on its own.
_BATCH_SIZE_CODES = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE})
# The producer that sends such records again, one per request and in order. Not idempotent: a
# permanent error of an idempotent producer bumps its epoch, which tansu (unlike Kafka) answers
# with PRODUCER_FENCED for good; one request in flight keeps the order without it.
_ALONE_SETTINGS: Mapping[str, Any] = {
    "linger.ms": 0,
    "batch.num.messages": 1,
    "enable.idempotence": False,
    "max.in.flight.requests.per.connection": 1,
}
_ALONE_DROPPED = ("transactional.id", "enable.gapless.guarantee")  # need idempotence / fence the main one
# The broker fenced this producer: none of its records will be accepted again. librdkafka reports
# this per record, not as a fatal error, for an idempotent non-transactional producer. Seen with
# tansu: records timed out while the broker was down (or a batch failed for good, e.g. too large),
# librdkafka bumped the producer epoch, and from then on every record of that producer failed with
# PRODUCER_FENCED, while a new producer worked (Kafka accepts such a bump). Retrying with the same
# producer would loop forever, so the channel fails instead and the worker is restarted with a new
# producer.
_FENCED_CODES = frozenset({KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH})
# Delivery errors that, while the broker answers, say the producer itself is stuck (progress.py):
# librdkafka retries a refused batch until message.timeout.ms, or the broker disowns the producer's
# id or sequence numbers (INTRODUCTION.md, "Idempotent Producer" > "Error handling").
_STUCK_CODES = frozenset(
    {KafkaError._MSG_TIMED_OUT, KafkaError.UNKNOWN_PRODUCER_ID, KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER}
)
_GROUP_OVERTAKEN = ("sent again alone after a batch-wide size error: later messages of its FIFO "
                    "group may be ahead of it in Kafka")
# The poll thread comes round every 0.1 s; silent this long, it is stuck in a callback.
STALL_AFTER = 30.0
# Stuck-producer evidence: one metadata request a second at most, each waiting this long.
CHECK_EVERY = 1.0
CHECK_TIMEOUT = 1.0
_CLOSED = "Kafka channel closed before delivery"
_SHED = "not sent: the circuit opened while it waited for room in the Kafka producer's queue"
_REPLACED = "its Kafka producer was replaced (stuck while the broker answered)"


class _Entry:
    """One message handed to ``publish``, until it is reported."""

    __slots__ = ("alone", "deadline", "generation", "later_in_group", "message", "produced_at", "record",
                 "report")

    def __init__(self, message: Message, report: Report, later_in_group: bool) -> None:
        self.message = message
        self.report = report
        # A later message of its FIFO group came in the same publish: if this one is sent again
        # alone, that one may be ahead of it in Kafka.
        self.later_in_group = later_in_group
        self.alone = False  # queued to be sent again on its own after a batch-wide size error
        self.record: Record | None = None  # built, while it waits for room in the local queue
        self.deadline = 0.0  # waiting for room: given up (RETRY) at this time
        self.generation = -1  # which producer took it (KafkaChannel._generation); -1: none yet
        self.produced_at = 0.0


class _LibrdkafkaLog:
    """librdkafka's log lines (served by ``poll``) for the ``logger`` setting.

    While ``quiet`` (``start()`` waiting for the broker) they go at DEBUG: a refused connection is
    logged on every reconnect, and ``start()``'s one-line error already gives the cause. Otherwise
    a line already logged in the last ``REPEAT_EVERY`` seconds goes at DEBUG: during an outage
    librdkafka says the same twice a second per broker.
    """

    REPEAT_EVERY = 60.0
    __slots__ = ("_last", "logger", "quiet")

    def __init__(self) -> None:
        self.logger = logging.getLogger("channels.kafka.librdkafka")
        self.quiet = False
        self._last: dict[str, float] = {}

    def log(self, level: int, msg: str, *args: Any) -> None:
        if self.quiet:
            level = logging.DEBUG
        elif level >= logging.WARNING:
            line = msg % args if args else msg
            now = time.monotonic()
            if now - self._last.get(line, -self.REPEAT_EVERY) < self.REPEAT_EVERY:
                level = logging.DEBUG
            else:
                if len(self._last) > 256:  # bounded: lines carry addresses and states
                    self._last.clear()
                self._last[line] = now
        self.logger.log(level, msg, *args)


class KafkaChannel(Channel):
    """One idempotent producer per worker process; build it with ``KafkaConfig.create(source)``.

    ``publish`` (the worker's loop thread) never waits: a record that finds librdkafka's local
    queue full waits in the channel's own queue, in order, for the poll thread to move it over
    as deliveries make room, at most ``message.timeout.ms``; ``shed`` gives those back when the
    worker's circuit opens. A producer that makes no progress while the broker answers (see
    ``progress.py``) is replaced by a new one on the poll thread, in the same process: what the old
    one held is reported RETRY, once, and sent again by the worker through the new one. (Not a
    worker restart: that would return every held message to SQS and raise its receive count, and
    a replacement made on doubtful evidence would then cost DLQ budget instead of a producer id.)
    """

    def __init__(self, config: KafkaConfig, source: str) -> None:
        self.config = config
        self.source = source
        settings = config.producer_config()
        # One partition per group and the idempotent producer's order: a group's messages given
        # together land in that order. (With another key a group may span partitions.)
        self.keeps_order = config.key == "group" and settings.get("enable.idempotence") in (True, "true")
        self._builder = RecordBuilder(config, source)
        self._producer: Producer | None = None
        self._conf: dict[str, Any] = {}  # the main producer's, for the single-record one
        self._token: _MskToken | None = None
        self._alone: Producer | None = None  # sends records alone; made on the first need
        self._alone_queue: deque[_Entry] = deque()  # for the poll thread to send alone, in order
        self._lock = threading.Lock()
        self._pending: set[_Entry] = set()  # handed over, not yet reported
        self._reports = LoopReports()  # from the poll thread to the worker's loop
        self._last_error: KafkaError | None = None
        self._last_logged = ""
        self._librdkafka_log = _LibrdkafkaLog()
        self._fatal: KafkaError | None = None
        self._closing = threading.Event()  # close() started: nothing more is produced
        self._stop = threading.Event()  # the poll thread ends
        self._poller: threading.Thread | None = None
        self._last_poll = time.monotonic()
        self._queue_wait = _message_timeout(settings)
        # Records built and waiting, in order, for room in the producer's local queue.
        self._waiting: deque[_Entry] = deque()
        # Held while records go into the main producer, and while it is replaced: no record goes
        # into a producer after it was purged. (Order of locks: this one, then _lock.)
        self._produce_lock = threading.Lock()
        self._generation = 0  # of the main producer; +1 per replacement
        # The replaced producer, kept until the next replacement or close(): its destruction
        # (rd_kafka_destroy joins its threads) must not fall to a publish still holding it.
        self._retired: Producer | None = None
        self._progress = ProducerProgress()  # guarded by _lock
        self._next_check = 0.0
        # Seams the unit tests set (instance attributes: this module is compiled, setup.py, and
        # compiled code does not see a method replaced on an instance).
        self._new_producer: Callable[[dict[str, Any]], Producer] = Producer
        self.stall_after = STALL_AFTER
        self.check_every = CHECK_EVERY

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Create the producer, check the broker and the topic (bounded wait), start polling."""
        if self._producer is not None:
            return
        self._librdkafka_log.quiet = True  # until the broker answered: errors go into ChannelError
        try:
            self._start()
        finally:
            self._librdkafka_log.quiet = False

    def _start(self) -> None:
        conf = self._client_config()
        try:
            producer = self._new_producer(conf)
        except (KafkaException, TypeError, ValueError) as exc:
            raise ChannelError(f"cannot create the Kafka producer: {_exc_text(exc)}{self._token_cause()}") from None
        self._producer = producer
        try:
            self._check_topic(conf)
        except BaseException:
            self._producer = None
            raise
        self._conf = conf
        self._start_polling()

    def _start_polling(self) -> None:
        # Delivery reports are served by poll(); a thread keeps serving them while publish is idle
        # (the last batch before a quiet spell would otherwise never be acked).
        self._stop.clear()
        self._last_poll = time.monotonic()
        self._poller = threading.Thread(target=self._poll_loop, name="kafka-poll", daemon=True)
        self._poller.start()

    def _client_config(self) -> dict[str, Any]:
        conf = self.config.producer_config()
        conf["logger"] = self._librdkafka_log
        conf["error_cb"] = self._on_error
        if self.config.auth == "scram-sha-512":
            username = os.environ.get("KAFKA_SASL_USERNAME")
            password = os.environ.get("KAFKA_SASL_PASSWORD")
            if not username or not password:
                raise ChannelError("--kafka-auth scram-sha-512 needs KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD "
                                   "in the environment")
            conf.setdefault("sasl.username", username)
            conf.setdefault("sasl.password", password)
        elif self.config.auth == "iam" and _uses_oauthbearer(conf):
            # Only with SASL/OAUTHBEARER: confluent-kafka's constructors wait (10 s) for a token
            # from oauth_cb, which librdkafka never asks for on a connection without SASL.
            self._token = msk_oauth_callback(self._region(), self.config.profile)
            conf["oauth_cb"] = self._token
        return conf

    def _region(self) -> str:
        region = self.config.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if not region:
            raise ChannelError("--kafka-auth iam needs a region (--region, AWS_REGION or AWS_DEFAULT_REGION)")
        return region

    def _token_cause(self) -> str:
        # confluent-kafka says only "OAuth token not set"; the callback kept the real cause.
        cause = self._token.last_error if self._token is not None else None
        return f" (MSK IAM token: {cause})" if cause else ""

    def _check_topic(self, conf: dict[str, Any]) -> None:
        assert self._producer is not None
        timeout = self.config.metadata_timeout
        deadline = time.monotonic() + timeout
        while True:
            try:
                # All topics, not list_topics(topic): asking for one topic by name makes brokers
                # with auto-create (tansu, Kafka's default) create it, hiding a typo.
                metadata = self._producer.list_topics(timeout=min(1.0, max(deadline - time.monotonic(), 0.01)))
                break
            except KafkaException as exc:
                self._producer.poll(0)  # serves error_cb: the cause (refused, auth failed, ...)
                if time.monotonic() < deadline:
                    continue
                cause = self._last_error.str() if self._last_error is not None else _error_text(exc)
                raise ChannelError(
                    f"cannot reach Kafka at {self.config.bootstrap_servers} within {timeout:g} s: {cause}"
                    f"{self._token_cause()}"
                ) from None
        topic = metadata.topics.get(self.config.topic)
        if topic is not None and topic.error is not None:
            raise ChannelError(f"Kafka topic {self.config.topic!r}: {topic.error.str()}")
        if topic is None:
            if not self.config.create_topic:
                raise ChannelError(
                    f"Kafka topic {self.config.topic!r} does not exist (create it, or pass --kafka-create-topic)"
                )
            self._create_topic(conf)

    def _create_topic(self, conf: dict[str, Any]) -> None:
        name = self.config.topic
        try:
            # The producer's conf, oauth_cb included: since confluent-kafka 2.13 every client
            # fetches its own token (on a background thread) and its constructor waits for it.
            admin = AdminClient(conf)
        except (KafkaException, TypeError, ValueError) as exc:
            raise ChannelError(f"cannot create Kafka topic {name!r}: {_exc_text(exc)}{self._token_cause()}") from None
        new = NewTopic(name, self.config.partitions, self.config.replication)
        future = admin.create_topics([new], request_timeout=self.config.metadata_timeout)[name]
        try:
            future.result(timeout=self.config.metadata_timeout + 5)
        except KafkaException as exc:
            error = _kafka_error(exc)
            if error is not None and error.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                return  # another worker won the race
            raise ChannelError(f"cannot create Kafka topic {name!r}: {_error_text(exc)}{self._token_cause()}") from None
        except (TimeoutError, CancelledError) as exc:  # no answer within the bound
            raise ChannelError(f"cannot create Kafka topic {name!r}: {_exc_text(exc)}{self._token_cause()}") from None
        finally:
            admin.poll(0)  # serves its error_cb and log lines
        replication = self.config.replication
        log.info("created Kafka topic %s (%d partitions, replication %s)", name, self.config.partitions,
                 "the broker's default" if replication == -1 else replication)

    def close(self, timeout: float = 30.0) -> None:
        """Deliver what is pending within ``timeout``; report the rest RETRY, exactly once.

        Returns within ``timeout`` plus a fraction of a second, however stuck the broker is."""
        if self._producer is None or self._closing.is_set():
            return
        deadline = time.monotonic() + max(timeout, 0.0)
        self._closing.set()  # nothing more is produced, and the producer is not replaced now
        with self._produce_lock:
            producer = self._producer
            waiting, self._waiting = list(self._waiting), deque()
        if producer is None:
            return
        self._settle_all(waiting, Outcome.RETRY, _CLOSED)
        self._drain(producer, deadline)
        self._stop.set()
        poller, self._poller = self._poller, None
        if poller is not None:  # it comes round every 0.1 s; one stuck in a callback is left behind
            poller.join(max(deadline - time.monotonic(), 0.0) + 0.3)
        for client in (producer, self._alone):
            if client is not None:
                client.purge(blocking=False)  # nothing is sent after close; no one serves the reports
        left = self._sweep()
        if left:
            log.warning("%d Kafka record(s) not delivered within %g s; their messages will be retried",
                        len(left), timeout)
        for entry in left:
            self._report(entry, Outcome.RETRY, _CLOSED)
        self._producer = self._alone = self._retired = None

    def _drain(self, producer: Producer, deadline: float) -> None:
        """Until ``deadline``, let what is in flight be delivered (the poll thread keeps serving
        reports and sending records alone)."""
        while self.pending:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            # flush() sends at once what waits for linger.ms; in slices, so the deadline holds.
            if producer.flush(min(left, 0.1)) == 0:
                alone = self._alone
                if alone is None or alone.flush(min(left, 0.1)) == 0:
                    time.sleep(min(left, 0.01))  # only records still to be sent alone are left

    def _sweep(self) -> list[_Entry]:
        """Take every unreported entry (now the caller's to report RETRY)."""
        with self._lock:
            left, self._pending = list(self._pending), set()
        self._alone_queue.clear()
        self._waiting.clear()
        return left

    def stalled(self) -> str | None:
        """A reason when the poll thread (delivery reports, records sent alone) stopped coming round."""
        poller = self._poller
        if poller is None or self._closing.is_set():
            return None
        if not poller.is_alive():
            return "the Kafka poll thread has ended: delivery reports are no longer served"
        silent = time.monotonic() - self._last_poll
        if silent > self.stall_after:
            return (f"the Kafka poll thread has not come round for {silent:.0f} s "
                    f"(limit {self.stall_after:g} s): stuck in a callback")
        return None

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            self._last_poll = time.monotonic()
            producer = self._producer  # the current one: it may have been replaced
            if producer is None:
                return
            try:
                self._poll_once(producer, 0.1)
            except Exception as exc:  # a dead poll thread would stop all reports: log, go on
                # poll() may raise a fatal error rather than hand it to error_cb (seen: the broker
                # restarted without its state, UNKNOWN_PRODUCER_ID). The producer is dead: replaced
                # as a stuck one is, else recorded as _on_error does (the next publish fails and the
                # worker restarts). Only logged, it stayed dead and its worker probed it for ever.
                error = _kafka_error(exc)
                if error is not None and error.fatal():
                    self._replace_dead(producer, error)
                else:
                    log.exception("Kafka poll loop error")
                self._stop.wait(0.1)

    def _replace_dead(self, producer: Producer, error: KafkaError) -> None:
        log.error("Kafka producer fatal error: %s", error.str())
        try:
            self._replace_producer(producer)
        except Exception:  # never let the poll thread die of it
            log.exception("cannot replace the Kafka producer")
        if self._producer is producer:  # not replaced: the worker restarts with a new one
            self._on_error(error)

    def _poll_once(self, producer: Producer, timeout: float) -> None:
        producer.poll(timeout)
        if self._waiting:
            self._send_waiting()
        if self._alone_queue:
            self._send_alone()
        alone = self._alone
        if alone is not None:
            alone.poll(0)
        self._check_progress(producer)

    def _on_error(self, err: KafkaError) -> None:
        # Client-level errors (broker down, auth failed); per-record errors arrive as delivery reports.
        if err.code() != KafkaError._ALL_BROKERS_DOWN:
            self._last_error = err  # the cause start() reports; "all brokers down" says less
        if err.fatal():
            self._fatal = err
            log.error("Kafka producer fatal error: %s", err.str())
            return
        if self._librdkafka_log.quiet:
            return  # start() is waiting for the broker: a failure ends in one line with the cause
        repeated = err.str() == self._last_logged
        self._last_logged = err.str()
        if not repeated:  # librdkafka repeats a refused connection on every retry
            log.warning("Kafka: %s", err.str())

    # -- publishing ----------------------------------------------------------------------------

    def publish(self, batch: Sequence[Message], report: Report) -> None:
        if self._producer is None:
            if self._closing.is_set():  # a late caller: not sent, returned to the queue
                for message in batch:
                    self._reports.send(report, message, Outcome.RETRY, _CLOSED)
                return
            raise ChannelError("the Kafka channel is not started")
        self._reports.bind()
        batch, report = self._builder.events.unwrap(batch, report)  # with --envelope: a message may be N events
        entries = self._register(batch, report)
        if self._fatal is not None:
            self._settle_all(entries, Outcome.RETRY, "Kafka producer failed")
            raise ChannelError(f"Kafka producer fatal error: {self._fatal.str()}")
        now = time.monotonic()
        settled: list[tuple[_Entry, Outcome, str]] = []  # reported once the lock is released
        with self._produce_lock:
            producer = self._producer  # replaced meanwhile, perhaps; None: close() has finished
            for i, entry in enumerate(entries):
                if self._closing.is_set() or producer is None:
                    settled += [(e, Outcome.RETRY, _CLOSED) for e in entries[i:]]
                    break
                try:
                    entry.record = self._builder.build(entry.message)
                except EventError as exc:
                    settled.append((entry, Outcome.REJECT, str(exc)))
                    continue
                # The local queue is full (broker slow or down): never wait here, on the worker's
                # loop. The record waits its turn behind those already waiting, in order.
                if not self._waiting:
                    try:
                        failed = self._produce(producer, entry, now)
                    except BufferError:
                        pass
                    else:
                        if failed is not None:
                            settled.append((entry, *failed))
                        continue
                entry.deadline = now + self._queue_wait
                self._waiting.append(entry)
        for entry, outcome, reason in settled:
            self._settle(entry, outcome, reason)
        # No poll(0) here: the poll thread serves every delivery report, a batch per loop wake-up.
        # A poll per publish served a few reports on the loop at a time, for more CPU per message.

    def _register(self, batch: Sequence[Message], report: Report) -> list[_Entry]:
        entries = []
        groups_later: set[str] = set()  # groups seen further on in the batch
        for message in reversed(batch):
            group = message.group_id
            entries.append(_Entry(message, report, group is not None and group in groups_later))
            if group is not None:
                groups_later.add(group)
        entries.reverse()
        with self._lock:
            self._pending.update(entries)
        return entries

    def _produce(self, producer: Producer, entry: _Entry, now: float) -> tuple[Outcome, str] | None:
        """Queue the entry's record in the main producer (under ``_produce_lock``): None when
        queued, else the outcome the produce error calls for (the caller reports it). Raises
        ``BufferError`` when the local queue is full (queue.buffering.max.messages / .kbytes)."""
        record = entry.record
        assert record is not None
        entry.generation, entry.produced_at = self._generation, now
        try:
            producer.produce(self.config.topic, record.value, record.key, headers=record.headers,
                             timestamp=record.timestamp, on_delivery=functools.partial(self._delivered, entry))
        except BufferError:
            entry.generation = -1  # not taken
            raise
        except KafkaException as exc:
            err = _kafka_error(exc)
            return _outcome(err) if err is not None else Outcome.RETRY, _error_text(exc)
        finally:
            if entry.generation >= 0:
                entry.record = None  # librdkafka has its copy
        return None

    def _send_waiting(self) -> None:
        """Move waiting records into the producer's local queue as room appears, in order; give
        those that waited ``message.timeout.ms`` back (poll thread)."""
        if self._closing.is_set():
            return  # close() gives back what waits
        settled: list[tuple[_Entry, Outcome, str]] = []  # reported once the lock is released
        with self._produce_lock:
            producer = self._producer
            now = time.monotonic()
            if self._fatal is not None or producer is None:  # nothing will make room
                settled = [(e, Outcome.RETRY, "Kafka producer failed") for e in self._waiting]
                self._waiting.clear()
            expired = f"Kafka producer queue still full after {self._queue_wait:g} s"
            while self._waiting:
                entry = self._waiting[0]
                # Entries of one publish wait in a row with one deadline: they expire together,
                # so no later message of a FIFO group goes out after an earlier one was given up.
                if now >= entry.deadline:
                    settled.append((self._waiting.popleft(), Outcome.RETRY, expired))
                    continue
                assert producer is not None
                try:
                    failed = self._produce(producer, entry, now)
                except BufferError:
                    break
                self._waiting.popleft()
                if failed is not None:
                    settled.append((entry, *failed))
        for entry, outcome, reason in settled:
            self._settle(entry, outcome, reason)

    def shed(self) -> None:
        """The worker's circuit opened: what waits for room in the local queue has not been
        sent, so it is given back now (RETRY) instead of going into the outage."""
        with self._produce_lock:
            waiting, self._waiting = list(self._waiting), deque()
        self._settle_all(waiting, Outcome.RETRY, _SHED)

    def _delivered(self, entry: _Entry, err: KafkaError | None, msg: Any = None) -> None:
        current = entry.generation == self._generation and not entry.alone
        if err is None:
            if msg is not None:
                self._log_delivery(entry, msg)
            if current:  # the common case, in one hold of the lock: progress, then _settle's part
                with self._lock:
                    self._progress.delivered()
                    if entry not in self._pending:
                        return  # already settled by close()
                    self._pending.discard(entry)
                self._report(entry, Outcome.ACK, "")
            elif entry.alone and entry.later_in_group:
                # Delivered, but after later records of its group: those must go again after it.
                self._settle(entry, Outcome.RETRY, _GROUP_OVERTAKEN)
            else:
                self._settle(entry, Outcome.ACK, "")
            return
        if err.code() in _BATCH_SIZE_CODES and not entry.alone:
            # Maybe the batch's size, not this record's: send it once more on its own.
            entry.alone = True
            self._alone_queue.append(entry)
            return
        if err.code() in _FENCED_CODES and self._fatal is None:
            self._fatal = err  # the next publish raises: the worker restarts with a new producer
            log.error("Kafka producer fenced by the broker: %s", err.str())
        elif err.code() in _STUCK_CODES and current:
            with self._lock:
                self._progress.failed(entry.produced_at)
        self._settle(entry, _outcome(err), err.str())

    # -- a stuck producer ----------------------------------------------------------------------

    def _check_progress(self, producer: Producer) -> None:
        """Ask the broker whether it is up when records of the current producer fail with no
        delivery since; replace the producer when the evidence is complete (poll thread)."""
        with self._lock:
            token = self._progress.check()
        now = time.monotonic()
        if token is None or now < self._next_check or producer is not self._producer:
            return
        self._next_check = now + self.check_every
        up = self._broker_answers(producer)
        with self._lock:
            replace = self._progress.answered(token, up, time.monotonic())
        if replace:
            self._replace_producer(producer)

    def _broker_answers(self, producer: Producer) -> bool:
        """A metadata request answered (all topics: asking for one by name may create it)."""
        try:
            producer.list_topics(timeout=CHECK_TIMEOUT)
        except KafkaException:
            return False
        return True

    def _replace_producer(self, old: Producer) -> None:
        """A new producer (a new producer id) takes over; what the old one held is purged and
        reported RETRY, once (poll thread)."""
        try:
            new = self._new_producer(self._conf)
        except (KafkaException, TypeError, ValueError) as exc:  # tried again on the next evidence
            log.error("cannot replace the stuck Kafka producer: %s%s", _exc_text(exc), self._token_cause())
            return
        with self._produce_lock:
            if self._closing.is_set() or self._producer is not old:
                return  # close() began: it deals with the current producer (the new one is dropped)
            self._producer = new
            self._generation += 1
            # librdkafka fails what it held with _PURGE_QUEUE / _PURGE_INFLIGHT; those reports are
            # never served (nothing polls it again): its records are reported below instead.
            old.purge(in_queue=True, in_flight=True, blocking=False)
        self._retired = old
        left = self._take_generation(self._generation - 1)
        log.warning("Kafka producer replaced: its records kept failing while the broker answered "
                    "(a broker that lost its state, e.g. restarted or replaced); %d undelivered "
                    "record(s) will be sent again through the new one", len(left))
        for entry in left:
            self._report(entry, Outcome.RETRY, _REPLACED)

    def _take_generation(self, generation: int) -> list[_Entry]:
        """Take the unreported entries a producer took (now the caller's to report)."""
        with self._lock:
            taken = [e for e in self._pending if e.generation == generation and not e.alone]
            self._pending.difference_update(taken)
        return taken

    def _log_delivery(self, entry: _Entry, msg: Any) -> None:
        offset = msg.offset()
        if offset < 0:
            # librdkafka reports DUPLICATE_SEQUENCE_NUMBER as delivered, with no offset: the broker
            # says an earlier send of the batch was stored. Rare on Kafka (a retry after a lost
            # answer); a broker that says it wrongly has dropped the record, so each one gets a line.
            log.warning("Kafka acked message %s as stored by an earlier send (a duplicate sequence "
                        "number, no offset given)", entry.message.id)
        elif log.isEnabledFor(logging.DEBUG):
            log.debug("message %s delivered to partition %s at offset %s", entry.message.id, msg.partition(), offset)

    def _send_alone(self) -> None:
        """Produce the queued records one per request (poll thread only: it alone takes from the
        queue)."""
        producer = self._alone or self._make_alone()
        if producer is None:  # tried once per round, not once per record (IAM: 10 s each)
            while self._alone_queue:
                self._settle(self._alone_queue.popleft(), Outcome.RETRY, "no Kafka producer for single records")
            return
        held: list[_Entry] = []
        while self._alone_queue:
            entry = self._alone_queue.popleft()
            with self._lock:
                settled = entry not in self._pending  # meanwhile, by close()
            if not settled and not self._produce_alone(producer, entry):
                held.append(entry)
        self._alone_queue.extendleft(reversed(held))  # ahead of any queued meanwhile, in order

    def _produce_alone(self, producer: Producer, entry: _Entry) -> bool:
        """False when it must wait (local queue full)."""
        try:
            record = self._builder.build(entry.message)
            producer.produce(self.config.topic, record.value, record.key, headers=record.headers,
                             timestamp=record.timestamp, on_delivery=functools.partial(self._delivered, entry))
        except BufferError:
            return False
        except EventError as exc:  # built once already; cannot happen, but never loop on it
            self._settle(entry, Outcome.REJECT, str(exc))
        except KafkaException as exc:
            err = _kafka_error(exc)
            self._settle(entry, _outcome(err) if err is not None else Outcome.RETRY, _error_text(exc))
        return True

    def _make_alone(self) -> Producer | None:
        conf = {**self._conf, **_ALONE_SETTINGS}
        for key in _ALONE_DROPPED:
            conf.pop(key, None)
        try:
            self._alone = self._new_producer(conf)
        except (KafkaException, TypeError, ValueError) as exc:
            log.error("cannot create the Kafka producer for single records: %s%s", _exc_text(exc), self._token_cause())
            return None
        log.warning("Kafka refused a record batch as too large (topic max.message.bytes below the "
                    "producer's batch.size?); its records are sent again one by one")
        return self._alone

    def _settle(self, entry: _Entry, outcome: Outcome, reason: str) -> None:
        with self._lock:
            if entry not in self._pending:
                return  # already settled by close()
            self._pending.discard(entry)
        self._report(entry, outcome, reason)

    def _report(self, entry: _Entry, outcome: Outcome, reason: str) -> None:
        """Every report goes here, once per entry (the worker logs a REJECT's reason)."""
        self._reports.send(entry.report, entry.message, outcome, reason)

    def _settle_all(self, entries: Iterable[_Entry], outcome: Outcome, reason: str) -> None:
        for entry in entries:
            self._settle(entry, outcome, reason)

    @property
    def pending(self) -> int:
        """Messages handed over and not yet reported."""
        with self._lock:
            return len(self._pending)


def _outcome(err: KafkaError) -> Outcome:
    return Outcome.REJECT if err.code() in _REJECT_CODES else Outcome.RETRY


def _uses_oauthbearer(conf: Mapping[str, Any]) -> bool:
    return (str(conf.get("sasl.mechanism", "")).upper() == "OAUTHBEARER"
            and str(conf.get("security.protocol", "")).upper().startswith("SASL"))


def _exc_text(exc: BaseException) -> str:
    if isinstance(exc, KafkaException):
        return _error_text(exc)
    return str(exc) or type(exc).__name__

