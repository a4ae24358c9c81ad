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

Record timestamp (``timestamp``): ``now`` (default) = the produce time (CreateTime set by the
producer); ``sent`` = ``SentTimestamp``. The broker's retention and segment rolling go by record
timestamps, so with ``sent`` a backlog older than the topic's ``retention.ms`` may be deleted by
the broker minutes after it was acked and deleted from SQS. The send time is always in the event's
``time`` attribute (``ce_time``) in ``binary`` and ``structured``.

In every format the SQS message attributes are also copied to headers:

=====================  ====================================================================
header name            the attribute name, unchanged
header value           ``String``/``Number`` (and custom ``String.x``/``Number.x``): the
                       ``StringValue`` as UTF-8; ``Binary``(``.x``): in ``raw``, the
                       ``BinaryValue`` bytes; in ``binary``/``structured``, those bytes as
                       base64 text (CloudEvents readers decode every header as UTF-8, so raw
                       bytes would make the record unreadable)
not copied             in ``binary``/``structured``, a name that is ``content-type`` or starts
                       with ``ce_`` (any case): a CloudEvents reader would take it for the
                       event's own ``content-type``/attribute. It is still in the data with
                       ``data_mode="message"``, and ``content-type`` sets the data's content
                       type with ``data_mode="body"``. ``raw`` copies every attribute.
=====================  ====================================================================

Record key (``key``): ``group`` = the ``MessageGroupId`` on FIFO queues (one group stays on one
partition, in order) and no key on standard queues; ``attribute:NAME`` = the value of message
attribute NAME (no key when the message lacks it); ``none``.

Acks: each message's delivery report decides its outcome, reported at once: delivered -> ACK;
an error about the record itself (too large, invalid record/timestamp) -> REJECT; any other
error -> RETRY. (confluent-kafka sets ``KafkaError.retriable()`` only for transactional errors,
so a plain producer's "retriable" flag would turn every broker outage into a reject; see
confluentinc/confluent-kafka-python#1804.)

FIFO order is the worker's (one sequencer for every channel): with ``key=group`` a group's
records go to one partition, and the idempotent producer keeps their order across its retries,
so the channel ``keeps_order`` and the worker hands over a group's messages together; it acks a
group's messages in order and sends everything after a failed one again, after it.

Size errors: the broker checks a topic's ``max.message.bytes`` against a whole record batch, and
librdkafka fails every record of a rejected batch with the same ``MSG_SIZE_TOO_LARGE`` /
``RECORD_LIST_TOO_LARGE``. So such a record is sent once more on its own, by a second producer
made on first need (one record per request, one request in flight, not idempotent: a duplicate is
possible, a reorder is not), and only a record that fails alone is rejected. A record sent alone
may land behind later records of its group from the same publish: it is then reported RETRY,
so the worker sends it and those after it again, in order.

Delivery bound: ``message.timeout.ms`` defaults to 60 s (librdkafka's: 300 s): the worker retries
a message in place and keeps its visibility extended, so a shorter attempt lets it see an outage
sooner. ``close(timeout)`` returns within ``timeout`` however stuck the broker is; what is still
undelivered is reported RETRY.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import CancelledError
from dataclasses import dataclass, field
from typing import Any, ClassVar

from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from channels.base import Channel, ChannelError, Message, Outcome, Report
from channels.events import DATA_MODES, EventError, EventFormat

__all__ = [
    "AUTH_MODES",
    "FORMATS",
    "TIMESTAMPS",
    "KafkaChannel",
    "KafkaConfig",
    "Record",
    "RecordBuilder",
    "parse_kafka_config",
    "parse_kafka_config_env",
]

log = logging.getLogger(__name__)

FORMATS = ("binary", "structured", "raw")
AUTH_MODES = ("none", "tls", "scram-sha-512", "iam")
TIMESTAMPS = ("now", "sent")
STRUCTURED_CONTENT_TYPE = b"application/cloudevents+json"

# Throughput defaults; anything in ``extra`` wins.
DEFAULTS: Mapping[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 5,
    "batch.size": 1_000_000,
    "compression.type": "lz4",
    # One delivery attempt: the worker retries in place with visibility extended, so a shorter
    # bound than librdkafka's 300 s lets it notice an outage (and open its circuit) sooner.
    "message.timeout.ms": 60_000,
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
# The ack a record's delivery report waits for: with acks=0 or 1 the poller would delete a message
# from SQS on the word of a leader that has not replicated it (acks=0: on no word at all), so a lost
# leader loses it. librdkafka takes "all" in any case and an integer for the rest (CONFIGURATION.md,
# request.required.acks, -1 .. 1000); only all/-1 waits for the in-sync replicas.
_ACKS_KEYS = ("acks", "request.required.acks")
_DURABLE_ACKS = frozenset({"all", "-1"})
_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")
_GROUP_OVERTAKEN = ("sent again alone after a batch-wide size error: later messages of its FIFO "
                    "group may be ahead of it in Kafka")
_CLOSED = "Kafka channel closed before delivery"
_ENV_NAME = "POLLER_KAFKA_CONFIG"


def parse_kafka_config(items: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """Parse repeated ``--kafka-config KEY=VALUE`` options (values are passed to librdkafka as is).

    Errors name the entry by number, never its text: it may be (part of) a secret."""
    return tuple(_config_pair(item, f"--kafka-config entry {n}") for n, item in enumerate(items, 1))


def parse_kafka_config_env(text: str) -> tuple[tuple[str, str], ...]:
    """Parse ``POLLER_KAFKA_CONFIG``: one ``KEY=VALUE`` per line, so values may hold spaces.

    Blank lines and lines starting with ``#`` are skipped; a trailing ``\\r`` is dropped (CRLF).
    Errors name the line by number, never its text."""
    pairs = []
    for n, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        pairs.append(_config_pair(line, f"{_ENV_NAME} line {n}"))
    return tuple(pairs)


def _config_pair(item: str, where: str) -> tuple[str, str]:
    name, sep, value = item.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"{where} must look like KEY=VALUE (its text is not shown: it may be a secret)")
    return name.strip(), value


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
    timestamp: str = "now"
    auth: str = "none"
    extra: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # may hold secrets
    overrides: tuple[tuple[str, str], ...] = ()
    create_topic: bool = False
    partitions: int = 3
    replication: int = 1
    region: str | None = None  # the cluster's, for IAM tokens
    profile: str | None = None  # the AWS profile that signs IAM tokens (else the default chain)
    metadata_timeout: float = 10.0

    def __post_init__(self) -> None:
        if not self.bootstrap_servers.strip():
            raise ValueError("Kafka bootstrap servers must not be empty")
        if "://" in self.bootstrap_servers:
            raise ValueError(f"--kafka-bootstrap-servers takes host:port[,host:port...], not a URL: "
                             f"{self.bootstrap_servers!r}")
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
        if self.timestamp not in TIMESTAMPS:
            raise ValueError(f"Kafka timestamp must be one of {', '.join(TIMESTAMPS)}, not {self.timestamp!r}")
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
        for name, value in self.extra:
            if name in _RESERVED_KEYS:
                raise ValueError(f"--kafka-config {name} cannot be set (the channel sets it)")
            if name == "default.topic.config":  # confluent-kafka wants a dict there, not a string
                raise ValueError("--kafka-config default.topic.config cannot be set: give topic settings "
                                 "(acks, message.timeout.ms, ...) as keys of their own")
            if name in _ACKS_KEYS and value.strip().lower() not in _DURABLE_ACKS:
                # Refused outright, no opt-in: the poller's one promise is delete-after-durable-write.
                raise ValueError(f"--kafka-config {name} must be all (-1): with fewer acks a message would be "
                                 f"deleted from SQS before the broker wrote it durably")
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
            raise ValueError(f"bad --kafka-config: {self._redact(_error_text(exc))}") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"bad --kafka-config: {self._redact(str(exc))}") from None

    def _redact(self, text: str) -> str:
        # librdkafka quotes a bad value ('Invalid value "x" for configuration property "y"'):
        # a usage error must not print what may be a secret.
        for _, value in self.extra:
            if value:
                text = text.replace(f'"{value}"', '"***"')
        return text

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

    @property
    def attempt_timeout(self) -> float:
        """A record waits for the broker at most ``message.timeout.ms``."""
        return _message_timeout(self.producer_config())

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


def _message_timeout(conf: Mapping[str, Any]) -> float:
    """``message.timeout.ms`` in seconds: the longest a record may wait in the local queue."""
    try:
        ms = int(conf.get("message.timeout.ms", 300_000))
    except (TypeError, ValueError):
        ms = 300_000
    return ms / 1000 if ms > 0 else 300.0  # 0 = no limit in librdkafka; do not wait forever here


@dataclass(frozen=True, slots=True)
class Record:
    """What ``Producer.produce`` gets for one message. ``timestamp`` 0 = the producer's clock."""

    value: bytes
    key: bytes | None
    headers: list[tuple[str, bytes]]
    timestamp: int


class RecordBuilder:
    """Builds records for one queue; pure, no broker needed."""

    __slots__ = ("_event", "_format", "_key_attribute", "_key_mode", "_sent_time")

    def __init__(self, config: KafkaConfig, source: str) -> None:
        self._event = EventFormat(source, config.data_mode, dict(config.overrides))
        self._format = config.format
        self._key_mode, _, self._key_attribute = config.key.partition(":")
        self._sent_time = config.timestamp == "sent"

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
        timestamp = sent_timestamp(message) if self._sent_time else 0  # 0: librdkafka stamps "now"
        return Record(value, self.key(message), headers, timestamp)

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
        value = attribute_value(name, attribute)
        if cloudevents and str(attribute.get("DataType", "")).startswith("Binary"):
            # CloudEvents readers (the SDKs) decode every header as UTF-8: raw bytes would make
            # the whole record unreadable. Base64, as SQS itself carries them in JSON.
            value = base64.b64encode(value)
        headers.append((name, value))
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
    """One message handed to ``publish``, until it is reported."""

    __slots__ = ("alone", "later_in_group", "message", "report")

    def __init__(self, message: Message, report: Report, later_in_group: bool) -> None:
        self.message = message
        self.report = report
        # A later message of its FIFO group came in the same publish: if this one is sent again
        # alone, that one may be ahead of it in Kafka.
        self.later_in_group = later_in_group
        self.alone = False  # queued to be sent again on its own after a batch-wide size error


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
        self.logger = logging.getLogger(__name__ + ".librdkafka")
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
    """One idempotent producer per worker process; build it with ``KafkaConfig.create(source)``."""

    # The poll thread comes round every 0.1 s; silent this long, it is stuck in a callback.
    STALL_AFTER: ClassVar[float] = 30.0

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
        self._last_error: KafkaError | None = None
        self._last_logged = ""
        self._librdkafka_log = _LibrdkafkaLog()
        self._fatal: KafkaError | None = None
        self._closing = threading.Event()  # close() started: nothing more is produced
        self._stop = threading.Event()  # the poll thread ends
        self._poller: threading.Thread | None = None
        self._last_poll = time.monotonic()
        self._queue_wait = _message_timeout(settings)

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
            raise ChannelError(f"cannot create the Kafka producer: {_describe(exc)}{self._token_cause()}") from None
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
        self._poller = threading.Thread(target=self._poll_loop, args=(self._producer,), name="kafka-poll",
                                        daemon=True)
        self._poller.start()

    @staticmethod
    def _new_producer(conf: dict[str, Any]) -> Producer:
        return Producer(conf)  # a seam: the unit tests put fakes here

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
            raise ChannelError(f"cannot create Kafka topic {name!r}: {_describe(exc)}{self._token_cause()}") from None
        new = NewTopic(name, self.config.partitions, self.config.replication)
        future = admin.create_topics([new], request_timeout=self.config.metadata_timeout)[name]
        try:
            future.result(timeout=self.config.metadata_timeout + 5)
        except KafkaException as exc:
            if exc.args and isinstance(exc.args[0], KafkaError) and exc.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS:
                return  # another worker won the race
            raise ChannelError(f"cannot create Kafka topic {name!r}: {_error_text(exc)}{self._token_cause()}") from None
        except (TimeoutError, CancelledError) as exc:  # no answer within the bound
            raise ChannelError(f"cannot create Kafka topic {name!r}: {_describe(exc)}{self._token_cause()}") from None
        finally:
            admin.poll(0)  # serves its error_cb and log lines
        log.info("created Kafka topic %s (%d partitions, replication %d)",
                 name, self.config.partitions, self.config.replication)

    def close(self, timeout: float = 30.0) -> None:
        """Deliver what is pending within ``timeout``; report the rest RETRY, exactly once.

        Returns within ``timeout`` plus a fraction of a second, however stuck the broker is."""
        producer = self._producer
        if producer is None or self._closing.is_set():
            return
        deadline = time.monotonic() + max(timeout, 0.0)
        self._closing.set()  # publish (and its queue-full wait) stops producing
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
            _report(entry, Outcome.RETRY, _CLOSED)
        self._producer = self._alone = None

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
        return left

    def stalled(self) -> str | None:
        """A reason when the poll thread (delivery reports, records sent alone) stopped coming round."""
        poller = self._poller
        if poller is None or self._closing.is_set():
            return None
        if not poller.is_alive():
            return "the Kafka poll thread has ended: delivery reports are no longer served"
        silent = time.monotonic() - self._last_poll
        if silent > self.STALL_AFTER:
            return (f"the Kafka poll thread has not come round for {silent:.0f} s "
                    f"(limit {self.STALL_AFTER:g} s): stuck in a callback")
        return None

    def _poll_loop(self, producer: Producer) -> None:
        while not self._stop.is_set():
            self._last_poll = time.monotonic()
            try:
                self._poll_once(producer, 0.1)
            except Exception:  # a dead poll thread would stop all reports: log, go on
                log.exception("Kafka poll loop error")
                self._stop.wait(0.1)

    def _poll_once(self, producer: Producer, timeout: float) -> None:
        producer.poll(timeout)
        if self._alone_queue:
            self._send_alone()
        alone = self._alone
        if alone is not None:
            alone.poll(0)

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
            if self._closing.is_set():  # a late caller: not sent, returned to the queue
                _report_each(batch, report, Outcome.RETRY, _CLOSED)
                return
            raise ChannelError("the Kafka channel is not started")
        entries = self._register(batch, report)
        if self._fatal is not None:
            self._settle_all(entries, Outcome.RETRY, "Kafka producer failed")
            raise ChannelError(f"Kafka producer fatal error: {self._fatal.str()}")
        for i, entry in enumerate(entries):
            if self._closing.is_set():
                self._settle_all(entries[i:], Outcome.RETRY, _CLOSED)
                break
            try:
                record = self._builder.build(entry.message)
            except EventError as exc:
                self._settle(entry, Outcome.REJECT, str(exc))
                continue
            reason = self._produce(producer, entry, record)
            if reason:  # the local queue stayed full, or close() began: the rest is not sent
                self._settle_all(entries[i:], Outcome.RETRY, reason)
                break
        producer.poll(0)

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

    def _produce(self, producer: Producer, entry: _Entry, record: Record) -> str:
        """Queue one record: "" when queued (or settled by a produce error), else why not."""
        give_up: float | None = None
        while True:
            try:
                producer.produce(self.config.topic, record.value, record.key, headers=record.headers,
                                 timestamp=record.timestamp, on_delivery=_callback(self, entry))
                return ""
            except BufferError:
                # The local queue is full (broker slow or down): wait for deliveries to make room,
                # but not past close(), nor longer than a queued record may wait for the broker.
                # (The worker holds at most --max-in-flight messages, far below the queue's size.)
                now = time.monotonic()
                give_up = now + self._queue_wait if give_up is None else give_up
                if self._closing.is_set():
                    return _CLOSED
                if self._fatal is not None:  # nothing will drain the queue
                    return "Kafka producer failed"
                if now >= give_up:
                    return f"Kafka producer queue still full after {self._queue_wait:g} s"
                producer.poll(0.1)
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                outcome = _outcome(err) if isinstance(err, KafkaError) else Outcome.RETRY
                self._settle(entry, outcome, _error_text(exc))
                return ""

    def _delivered(self, entry: _Entry, err: KafkaError | None, msg: Any = None) -> None:
        if err is None:
            if msg is not None:
                self._log_delivery(entry, msg)
            if entry.alone and entry.later_in_group:
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
        self._settle(entry, _outcome(err), err.str())

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
                if entry not in self._pending:  # settled meanwhile by close()
                    continue
            if not self._produce_alone(producer, entry):
                held.append(entry)
        self._alone_queue.extendleft(reversed(held))  # ahead of any queued meanwhile, in order

    def _produce_alone(self, producer: Producer, entry: _Entry) -> bool:
        """False when it must wait (local queue full)."""
        try:
            record = self._builder.build(entry.message)
            producer.produce(self.config.topic, record.value, record.key, headers=record.headers,
                             timestamp=record.timestamp, on_delivery=_callback(self, entry))
        except BufferError:
            return False
        except EventError as exc:  # built once already; cannot happen, but never loop on it
            self._settle(entry, Outcome.REJECT, str(exc))
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            self._settle(entry, _outcome(err) if isinstance(err, KafkaError) else Outcome.RETRY, _error_text(exc))
        return True

    def _make_alone(self) -> Producer | None:
        conf = {**self._conf, **_ALONE_SETTINGS}
        for key in _ALONE_DROPPED:
            conf.pop(key, None)
        try:
            self._alone = self._new_producer(conf)
        except (KafkaException, TypeError, ValueError) as exc:
            log.error("cannot create the Kafka producer for single records: %s%s", _describe(exc), self._token_cause())
            return None
        log.warning("Kafka refused a record batch as too large (topic max.message.bytes below the "
                    "producer's batch.size?); its records are sent again one by one")
        return self._alone

    def _settle(self, entry: _Entry, outcome: Outcome, reason: str) -> None:
        with self._lock:
            if entry not in self._pending:
                return  # already settled by close()
            self._pending.discard(entry)
        _report(entry, outcome, reason)

    def _settle_all(self, entries: Iterable[_Entry], outcome: Outcome, reason: str) -> None:
        for entry in entries:
            self._settle(entry, outcome, reason)

    @property
    def pending(self) -> int:
        """Messages handed over and not yet reported."""
        with self._lock:
            return len(self._pending)


def _report(entry: _Entry, outcome: Outcome, reason: str) -> None:
    if outcome is Outcome.REJECT:
        log.warning("Kafka rejected message %s: %s", entry.message.id, reason)
    try:
        entry.report(entry.message, outcome, reason)
    except Exception:
        log.exception("report callback failed for message %s", entry.message.id)


def _report_each(batch: Sequence[Message], report: Report, outcome: Outcome, reason: str) -> None:
    for message in batch:
        try:
            report(message, outcome, reason)
        except Exception:
            log.exception("report callback failed for message %s", message.id)


def _callback(channel: KafkaChannel, entry: _Entry) -> Any:
    def on_delivery(err: KafkaError | None, msg: Any) -> None:
        channel._delivered(entry, err, msg)

    return on_delivery


def _outcome(err: KafkaError) -> Outcome:
    return Outcome.REJECT if err.code() in _REJECT_CODES else Outcome.RETRY


def _uses_oauthbearer(conf: Mapping[str, Any]) -> bool:
    return (str(conf.get("sasl.mechanism", "")).upper() == "OAUTHBEARER"
            and str(conf.get("security.protocol", "")).upper().startswith("SASL"))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, KafkaException):
        return _error_text(exc)
    return str(exc) or type(exc).__name__


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    text = text if len(text) <= limit else text[:limit] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _MskToken:
    """confluent-kafka ``oauth_cb``: an MSK IAM token signed with the default AWS credentials.

    librdkafka swallows an exception raised here (it learns only that the refresh failed, and a
    client's constructor then says "OAuth token not set"), so the cause is logged here in one line
    (the traceback at DEBUG; the message of a credentials error holds no secret) and kept in
    ``last_error`` for start()'s error; then it is raised again, so librdkafka fails the refresh.
    """

    def __init__(self, region: str, provider: Any, profile: str | None = None) -> None:
        self.region = region
        self._provider = provider
        self._profile = profile
        self.last_error: str | None = None

    def __call__(self, _config: str) -> tuple[str, float]:
        try:
            if self._profile:
                token, expiry_ms = self._provider.generate_auth_token_from_profile(self.region, self._profile)
            else:
                token, expiry_ms = self._provider.generate_auth_token(self.region)
        except Exception as exc:
            cause = _one_line(exc)
            repeated = cause == self.last_error  # librdkafka retries the refresh every few seconds
            self.last_error = cause
            log.log(logging.DEBUG if repeated else logging.ERROR, "MSK IAM token for %s failed: %s", self.region, cause)
            log.debug("MSK IAM token failure", exc_info=True)
            raise
        self.last_error = None
        return token, expiry_ms / 1000.0  # librdkafka wants seconds since the epoch


def msk_oauth_callback(region: str, profile: str | None = None) -> _MskToken:
    """confluent-kafka ``oauth_cb`` that signs an MSK IAM token with the AWS credentials of
    ``profile``, else the default chain."""
    try:
        from aws_msk_iam_sasl_signer import MSKAuthTokenProvider
    except ImportError:
        raise ChannelError(
            "--kafka-auth iam needs the aws-msk-iam-sasl-signer-python package: install the msk extra "
            "(pip install '.[msk]' in a checkout)"
        ) from None
    return _MskToken(region, MSKAuthTokenProvider, profile)
