"""The Kafka channel: every SQS message becomes one Kafka record; the delivery report is the ack.

Records (CloudEvents Kafka protocol binding 1.0)
================================================

``binary`` (default)
    value: the event data (``EventFormat.data``: the whole message as JSON, or the Body with
    ``data_mode="body"``); headers: ``ce_<attribute>`` for every context attribute and extension
    (``ce_specversion``, ``ce_id``, ``ce_source``, ``ce_type``, ``ce_time``, ...), UTF-8, and
    ``content-type`` = the data's content type.
``structured``
    value: the whole event as JSON (``EventFormat.structured``); header ``content-type:
    application/cloudevents+json``.
``raw``
    value: the Body bytes; no CloudEvents headers.

In every format the record timestamp is ``SentTimestamp`` (milliseconds) and the SQS message
attributes are also copied to headers:

=====================  ====================================================================
header name            the attribute name, unchanged
header value           ``String``/``Number`` (and custom ``String.x``/``Number.x``): the
                       ``StringValue`` as UTF-8; ``Binary``(``.x``): the ``BinaryValue``
                       bytes (given as ``bytes`` by boto3; a ``str`` is taken as base64, as
                       SQS's JSON protocol sends it)
not copied             in ``binary``/``structured``, a name that is ``content-type`` or starts
                       with ``ce_`` (any case): a CloudEvents reader would take it for the
                       event's own ``content-type``/attribute. It is still in the data with
                       ``data_mode="message"``, and ``content-type`` sets the data's content
                       type with ``data_mode="body"``. ``raw`` copies every attribute.
=====================  ====================================================================

Record key (``key``): ``group`` = the ``MessageGroupId`` on FIFO queues (one group stays on one
partition, in order) and no key on standard queues; ``attribute:NAME`` = the value of message
attribute NAME (no key when the message lacks it); ``none``.

Acks and FIFO order: each message's delivery report decides its outcome: delivered -> ACK;
an error about the record itself (too large, invalid record/timestamp) -> REJECT; any other
error -> RETRY. (confluent-kafka sets ``KafkaError.retriable()`` only for transactional errors,
so a plain producer's "retriable" flag would turn every broker outage into a reject; see
confluentinc/confluent-kafka-python#1804.) Reports of the messages of one FIFO group in one batch
are held until all of them are settled and are then given in batch order; after the first that
failed, the rest of the group is reported RETRY even if delivered (at-least-once allows the
duplicate; acking them would let them overtake the failed one).
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from channels.base import Channel, ChannelError, Message, Outcome, Report
from channels.events import DATA_MODES, EventError, EventFormat

__all__ = [
    "AUTH_MODES",
    "FORMATS",
    "KafkaChannel",
    "KafkaConfig",
    "Record",
    "RecordBuilder",
    "parse_kafka_config",
]

log = logging.getLogger(__name__)

FORMATS = ("binary", "structured", "raw")
AUTH_MODES = ("none", "tls", "scram-sha-512", "iam")
STRUCTURED_CONTENT_TYPE = b"application/cloudevents+json"

# Throughput defaults; anything in ``extra`` wins.
DEFAULTS: Mapping[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 5,
    "batch.size": 1_000_000,
    "compression.type": "lz4",
}
# Python-side callbacks we own; a string from --kafka-config cannot be one.
_RESERVED_KEYS = frozenset(
    {"on_delivery", "delivery.report.only.error", "error_cb", "oauth_cb", "logger", "stats_cb",
     "throttle_cb", "bootstrap.servers"}
)
# Errors about the record itself: sending it again can never work.
_REJECT_CODES = frozenset(
    {KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_RECORD, KafkaError.INVALID_MSG,
     KafkaError.INVALID_MSG_SIZE, KafkaError.RECORD_LIST_TOO_LARGE, KafkaError.INVALID_TIMESTAMP,
     KafkaError._BAD_MSG, KafkaError._INVALID_ARG}
)
# The broker fenced this producer: none of its records will be accepted again. librdkafka reports
# this per record, not as a fatal error, for an idempotent non-transactional producer. Seen with
# tansu: records timed out while the broker was down, librdkafka bumped the producer epoch, and
# after the restart every record of that producer failed with PRODUCER_FENCED for good, while a new
# producer worked. Retrying with the same producer would loop forever, so the channel fails
# instead and the worker is restarted with a new producer.
_FENCED_CODES = frozenset({KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH})
_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")
_GROUP_FAILED = "an earlier message of its FIFO group in this batch was not delivered"


def parse_kafka_config(items: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """Parse repeated ``--kafka-config KEY=VALUE`` options (values are passed to librdkafka as is)."""
    pairs = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--kafka-config {item!r} must look like KEY=VALUE")
        pairs.append((name.strip(), value))
    return tuple(pairs)


@dataclass(frozen=True, slots=True, kw_only=True)
class KafkaConfig:
    """Settings of the Kafka channel; picklable, so it can be sent to spawned workers.

    ``extra`` is librdkafka configuration (``(key, value)`` pairs) applied last, over the defaults
    and the auth settings. Secrets for ``scram-sha-512`` come from the environment at ``start``
    (``KAFKA_SASL_USERNAME``/``KAFKA_SASL_PASSWORD``) and are never stored here.
    """

    name: ClassVar[str] = "kafka"

    bootstrap_servers: str
    topic: str
    format: str = "binary"
    data_mode: str = "message"
    key: str = "group"
    auth: str = "none"
    extra: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # may hold secrets
    overrides: tuple[tuple[str, str], ...] = ()
    create_topic: bool = False
    partitions: int = 3
    replication: int = 1
    region: str | None = None
    metadata_timeout: float = 10.0

    def __post_init__(self) -> None:
        if not self.bootstrap_servers.strip():
            raise ValueError("Kafka bootstrap servers must not be empty")
        if not _TOPIC_NAME.fullmatch(self.topic) or self.topic in (".", ".."):
            raise ValueError(f"{self.topic!r} is not a valid Kafka topic name")
        if self.format not in FORMATS:
            raise ValueError(f"Kafka format must be one of {', '.join(FORMATS)}, not {self.format!r}")
        if self.data_mode not in DATA_MODES:
            raise ValueError(f"data mode must be one of {', '.join(DATA_MODES)}, not {self.data_mode!r}")
        if self.key not in ("group", "none") and not (
            self.key.startswith("attribute:") and len(self.key) > len("attribute:")
        ):
            raise ValueError(f"Kafka key must be group, none or attribute:NAME, not {self.key!r}")
        if self.auth not in AUTH_MODES:
            raise ValueError(f"Kafka auth must be one of {', '.join(AUTH_MODES)}, not {self.auth!r}")
        if self.partitions < 1:
            raise ValueError(f"Kafka partitions must be at least 1, not {self.partitions}")
        if self.replication < 1 and self.replication != -1:
            raise ValueError(f"Kafka replication must be at least 1 (or -1: the broker's default), not {self.replication}")
        if self.metadata_timeout <= 0:
            raise ValueError("Kafka metadata timeout must be positive")
        # Accept a mapping too, but store hashable, picklable pairs.
        object.__setattr__(self, "extra", _pairs(self.extra, "--kafka-config"))
        object.__setattr__(self, "overrides", _pairs(self.overrides, "overrides"))
        for name, _ in self.extra:
            if name in _RESERVED_KEYS:
                raise ValueError(f"--kafka-config {name} cannot be set (the channel sets it)")
        self._check_librdkafka_config()

    def _check_librdkafka_config(self) -> None:
        # librdkafka is the authority on its ~200 properties and their values: build a client
        # without bootstrap servers (it connects to nothing) and turn its complaint into one line.
        conf = {**self.producer_config(), "logger": log}
        conf.pop("bootstrap.servers")
        if self.auth == "scram-sha-512":  # the real ones come from the environment at start()
            conf.setdefault("sasl.username", "check")
            conf.setdefault("sasl.password", "check")
        try:
            Producer(conf)
        except KafkaException as exc:
            raise ValueError(f"bad --kafka-config: {_error_text(exc)}") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"bad --kafka-config: {exc}") from None

    def producer_config(self) -> dict[str, Any]:
        """The librdkafka configuration without secrets or callbacks: defaults < auth < extra."""
        conf: dict[str, Any] = {"bootstrap.servers": self.bootstrap_servers, **DEFAULTS}
        if self.auth == "tls":
            conf["security.protocol"] = "SSL"
        elif self.auth == "scram-sha-512":
            conf.update({"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512"})
        elif self.auth == "iam":
            conf.update({"security.protocol": "SASL_SSL", "sasl.mechanism": "OAUTHBEARER"})
        conf.update(self.extra)
        return conf

    def create(self, source: str) -> KafkaChannel:
        return KafkaChannel(self, source)


def _pairs(value: Any, what: str) -> tuple[tuple[str, str], ...]:
    items = value.items() if isinstance(value, Mapping) else value
    try:
        return tuple((str(k), str(v)) for k, v in items)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be (key, value) pairs") from None


def _error_text(exc: KafkaException) -> str:
    err = exc.args[0] if exc.args else None
    return err.str() if isinstance(err, KafkaError) else str(exc)


@dataclass(frozen=True, slots=True)
class Record:
    """What ``Producer.produce`` gets for one message. ``timestamp`` 0 = the producer's clock."""

    value: bytes
    key: bytes | None
    headers: list[tuple[str, bytes]]
    timestamp: int


class RecordBuilder:
    """Builds records for one queue; pure, no broker needed."""

    __slots__ = ("_event", "_format", "_key_attribute", "_key_mode")

    def __init__(self, config: KafkaConfig, source: str) -> None:
        self._event = EventFormat(source, config.data_mode, dict(config.overrides))
        self._format = config.format
        self._key_mode, _, self._key_attribute = config.key.partition(":")

    def build(self, message: Message) -> Record:
        """Raises ``EventError`` when the message cannot be made a record of this format."""
        if self._format == "binary":
            value, content_type = self._event.data(message)
            headers = [("ce_" + name, v.encode()) for name, v in self._event.attributes(message).items()]
            headers.append(("content-type", content_type.encode()))
            headers += attribute_headers(message, cloudevents=True)
        elif self._format == "structured":
            value = self._event.structured(message)
            headers = [("content-type", STRUCTURED_CONTENT_TYPE)]
            headers += attribute_headers(message, cloudevents=True)
        else:
            value = message.body.encode()
            headers = attribute_headers(message, cloudevents=False)
        return Record(value, self.key(message), headers, sent_timestamp(message))

    def key(self, message: Message) -> bytes | None:
        if self._key_mode == "group":
            group = message.group_id
            return group.encode() if group else None
        if self._key_mode == "attribute":
            attribute = message.message_attributes.get(self._key_attribute)
            return None if attribute is None else attribute_value(self._key_attribute, attribute)
        return None


def attribute_headers(message: Message, *, cloudevents: bool) -> list[tuple[str, bytes]]:
    """Message attributes as Kafka headers (see the module docstring for the mapping)."""
    headers = []
    for name, attribute in message.message_attributes.items():
        lowered = name.lower()
        if cloudevents and (lowered == "content-type" or lowered.startswith("ce_")):
            continue
        headers.append((name, attribute_value(name, attribute)))
    return headers


def attribute_value(name: str, attribute: Mapping[str, Any]) -> bytes:
    if str(attribute.get("DataType", "")).startswith("Binary"):
        value = attribute.get("BinaryValue", b"")
        if isinstance(value, bytes | bytearray):
            return bytes(value)
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError, TypeError):
            raise EventError(f"binary attribute {name!r} is not base64") from None
    return str(attribute.get("StringValue", "")).encode()


def sent_timestamp(message: Message) -> int:
    try:
        return max(int(message.attributes.get("SentTimestamp", 0)), 0)
    except ValueError:
        return 0  # the CloudEvents formats reject it in EventFormat.attributes; raw uses "now"


class _Entry:
    """One message of a publish batch, until it is reported."""

    __slots__ = ("message", "outcome", "reason", "run")

    def __init__(self, message: Message, run: _Run) -> None:
        self.message = message
        self.run = run
        self.outcome: Outcome | None = None
        self.reason = ""


class _Run:
    """Messages reported together in order: one FIFO group of one batch, or a single message."""

    __slots__ = ("entries", "failed", "report", "unsettled")

    def __init__(self, report: Report) -> None:
        self.report = report
        self.entries: list[_Entry] = []
        self.unsettled = 0
        self.failed = False  # a record failed before being produced: skip the rest of the group


class _LibrdkafkaLog:
    """librdkafka's log lines (served by ``poll``) for the ``logger`` setting.

    While ``quiet`` (``start()`` waiting for the broker) they go at DEBUG: a refused connection is
    logged on every reconnect, and ``start()``'s one-line error already gives the cause.
    """

    __slots__ = ("logger", "quiet")

    def __init__(self) -> None:
        self.logger = logging.getLogger(__name__ + ".librdkafka")
        self.quiet = False

    def log(self, level: int, msg: str, *args: Any) -> None:
        self.logger.log(logging.DEBUG if self.quiet else level, msg, *args)


class KafkaChannel(Channel):
    """One idempotent producer per worker process; build it with ``KafkaConfig.create(source)``."""

    def __init__(self, config: KafkaConfig, source: str) -> None:
        self.config = config
        self.source = source
        self._builder = RecordBuilder(config, source)
        self._producer: Producer | None = None
        self._lock = threading.Lock()
        self._runs: set[_Run] = set()  # runs with at least one unsettled entry
        self._last_error: KafkaError | None = None
        self._last_logged = ""
        self._librdkafka_log = _LibrdkafkaLog()
        self._fatal: KafkaError | None = None
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

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
            producer = Producer(conf)
        except (KafkaException, TypeError, ValueError) as exc:
            raise ChannelError(f"cannot create the Kafka producer: {_describe(exc)}") from None
        self._producer = producer
        try:
            self._check_topic(conf)
        except BaseException:
            self._producer = None
            raise
        # Delivery reports are served by poll(); a thread keeps serving them while publish is idle
        # (the last batch before a quiet spell would otherwise never be acked).
        self._stop.clear()
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
                raise ChannelError("--kafka-auth scram-sha-512 needs KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD in the environment")
            conf.setdefault("sasl.username", username)
            conf.setdefault("sasl.password", password)
        elif self.config.auth == "iam":
            conf["oauth_cb"] = msk_oauth_callback(self._region())
        return conf

    def _region(self) -> str:
        region = self.config.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if not region:
            raise ChannelError("--kafka-auth iam needs a region (--region, AWS_REGION or AWS_DEFAULT_REGION)")
        return region

    def _check_topic(self, conf: dict[str, Any]) -> None:
        assert self._producer is not None
        self._producer.poll(0)  # serves oauth_cb (iam) before the first connection needs a token
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
        admin = AdminClient(conf)
        new = NewTopic(self.config.topic, self.config.partitions, self.config.replication)
        future = admin.create_topics([new], request_timeout=self.config.metadata_timeout)[self.config.topic]
        try:
            future.result(timeout=self.config.metadata_timeout + 5)
        except KafkaException as exc:
            if exc.args and isinstance(exc.args[0], KafkaError) and exc.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS:
                return  # another worker won the race
            raise ChannelError(f"cannot create Kafka topic {self.config.topic!r}: {_error_text(exc)}") from None
        except Exception as exc:  # e.g. concurrent.futures.TimeoutError
            raise ChannelError(f"cannot create Kafka topic {self.config.topic!r}: {_describe(exc)}") from None
        log.info("created Kafka topic %s (%d partitions, replication %d)",
                 self.config.topic, self.config.partitions, self.config.replication)

    def close(self, timeout: float = 30.0) -> None:
        """Flush within ``timeout``; report what is still undelivered as RETRY, exactly once."""
        producer = self._producer
        if producer is None:
            return
        left = producer.flush(max(timeout, 0.0))
        self._stop.set()
        if self._poller is not None:
            self._poller.join()
            self._poller = None
        if left:
            log.warning("%d Kafka records not delivered within %g s; their messages will be retried", left, timeout)
            producer.purge()  # their reports (_PURGE_*) arrive as RETRY below or are ignored
            producer.poll(0)
        with self._lock:
            runs, self._runs = self._runs, set()
            for run in runs:
                for entry in run.entries:
                    if entry.outcome is None:
                        entry.outcome, entry.reason = Outcome.RETRY, "Kafka channel closed before delivery"
        for run in runs:
            self._report_run(run)
        self._producer = None

    def _poll_loop(self) -> None:
        producer = self._producer
        assert producer is not None
        while not self._stop.is_set():
            producer.poll(0.1)

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
        producer = self._producer
        if producer is None:
            raise ChannelError("the Kafka channel is not started")
        # Group the batch into runs before producing anything, so that no run can complete (and
        # be reported) while later entries of it are still to be produced.
        entries = []
        groups: dict[str, _Run] = {}
        for message in batch:
            group = message.group_id
            run = groups.get(group) if group else None
            if run is None:
                run = _Run(report)
                if group:
                    groups[group] = run
            entry = _Entry(message, run)
            run.entries.append(entry)
            run.unsettled += 1
            entries.append(entry)
        with self._lock:
            self._runs.update(entry.run for entry in entries)

        if self._fatal is not None:
            for entry in entries:
                self._settle(entry, Outcome.RETRY, "Kafka producer failed")
            raise ChannelError(f"Kafka producer fatal error: {self._fatal.str()}")

        topic = self.config.topic
        for entry in entries:
            if entry.run.failed:
                self._settle(entry, Outcome.RETRY, _GROUP_FAILED)
                continue
            try:
                record = self._builder.build(entry.message)
            except EventError as exc:
                entry.run.failed = True
                self._settle(entry, Outcome.REJECT, str(exc))
                continue
            callback = _callback(self, entry)
            while True:
                try:
                    producer.produce(topic, record.value, record.key, headers=record.headers,
                                     timestamp=record.timestamp, on_delivery=callback)
                    break
                except BufferError:
                    producer.poll(0.1)  # local queue full: wait for deliveries (backpressure)
                except KafkaException as exc:
                    entry.run.failed = True
                    err = exc.args[0] if exc.args else None
                    outcome = _outcome(err) if isinstance(err, KafkaError) else Outcome.RETRY
                    self._settle(entry, outcome, _error_text(exc))
                    break
        producer.poll(0)

    def _delivered(self, entry: _Entry, err: KafkaError | None) -> None:
        if err is None:
            self._settle(entry, Outcome.ACK, "")
            return
        if err.code() in _FENCED_CODES and self._fatal is None:
            self._fatal = err  # the next publish raises: the worker restarts with a new producer
            log.error("Kafka producer fenced by the broker: %s", err.str())
        self._settle(entry, _outcome(err), err.str())

    def _settle(self, entry: _Entry, outcome: Outcome, reason: str) -> None:
        run = entry.run
        with self._lock:
            if entry.outcome is not None:
                return  # already settled by close()
            entry.outcome, entry.reason = outcome, reason
            run.unsettled -= 1
            if run.unsettled or run not in self._runs:
                return
            self._runs.discard(run)
        self._report_run(run)

    @staticmethod
    def _report_run(run: _Run) -> None:
        # Called by exactly one thread per run (the one that removed it from _runs).
        failed = False
        for entry in run.entries:
            outcome, reason = entry.outcome, entry.reason
            assert outcome is not None
            if failed:
                outcome, reason = Outcome.RETRY, _GROUP_FAILED
            elif outcome is not Outcome.ACK:
                failed = True
            if outcome is Outcome.REJECT:
                log.warning("Kafka rejected message %s: %s", entry.message.id, reason)
            try:
                run.report(entry.message, outcome, reason)
            except Exception:
                log.exception("report callback failed for message %s", entry.message.id)

    @property
    def pending(self) -> int:
        """Messages handed over and not yet reported."""
        with self._lock:
            return sum(run.unsettled for run in self._runs)


def _callback(channel: KafkaChannel, entry: _Entry) -> Any:
    def on_delivery(err: KafkaError | None, _msg: object) -> None:
        channel._delivered(entry, err)

    return on_delivery


def _outcome(err: KafkaError) -> Outcome:
    return Outcome.REJECT if err.code() in _REJECT_CODES else Outcome.RETRY


def _describe(exc: BaseException) -> str:
    if isinstance(exc, KafkaException):
        return _error_text(exc)
    return str(exc) or type(exc).__name__


def msk_oauth_callback(region: str) -> Any:
    """confluent-kafka ``oauth_cb`` that signs an MSK IAM token with the default AWS credentials."""
    try:
        from aws_msk_iam_sasl_signer import MSKAuthTokenProvider
    except ImportError:
        raise ChannelError(
            "--kafka-auth iam needs the aws-msk-iam-sasl-signer-python package: pip install 'sqs-poller[msk]'"
        ) from None

    def oauth_cb(_config: str) -> tuple[str, float]:
        token, expiry_ms = MSKAuthTokenProvider.generate_auth_token(region)
        return token, expiry_ms / 1000.0  # librdkafka wants seconds since the epoch

    return oauth_cb

