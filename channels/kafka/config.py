"""The Kafka channel's settings: ``KafkaConfig`` and the ``--kafka-config`` parsers."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from confluent_kafka import KafkaError, KafkaException, Producer

from channels.events import DATA_MODES, EventShape

if TYPE_CHECKING:
    from channels.kafka.channel import KafkaChannel

__all__ = [
    "AUTH_MODES",
    "DEFAULTS",
    "FORMATS",
    "TIMESTAMPS",
    "KafkaConfig",
    "parse_kafka_config",
    "parse_kafka_config_env",
]

log = logging.getLogger("channels.kafka")

FORMATS = ("binary", "structured", "raw")
AUTH_MODES = ("none", "tls", "scram-sha-512", "iam")
TIMESTAMPS = ("now", "sent")

# Throughput defaults; anything in ``extra`` wins.
DEFAULTS: Mapping[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    # librdkafka's default is 5 ms. At 1,500 msg/s into 3 partitions that makes batches of two or
    # three records, and each batch costs a request, a broker-thread wake-up and a delivery-report
    # wake-up on the worker's loop. 20 ms cut the channel's own CPU per message by ~30%
    # (benchmarks/kafka_channel.py on tansu, interleaved rounds, 2026-12-06: 115 -> 84 us; 50 ms
    # gave 76). A whole worker's, in interleaved drains of 20,000 messages from LocalStack, fell
    # ~6% more from 5 to 20 ms and 13-30% more from 20 to 50 ms (six pairs, 2026-12-07), mostly on
    # the loop: fewer, larger batches of reports. It holds each message 50 ms more, so the
    # channel's default --max-in-flight is 400, not 200 (plugin.py): at 200 the held messages
    # reached the cap at 1,600 msg/s. Latency-bound topics: --kafka-config linger.ms=5.
    "linger.ms": 50,
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
# The ack a record's delivery report waits for: with acks=0 or 1 the poller would delete a message
# from SQS on the word of a leader that has not replicated it (acks=0: on no word at all), so a lost
# leader loses it. librdkafka takes "all" in any case and an integer for the rest (CONFIGURATION.md,
# request.required.acks, -1 .. 1000); only all/-1 waits for the in-sync replicas.
_ACKS_KEYS = ("acks", "request.required.acks")
_DURABLE_ACKS = frozenset({"all", "-1"})
_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")
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
    shape: EventShape = field(default_factory=EventShape)  # --envelope, --ce-type, --ce-source
    create_topic: bool = False
    partitions: int = 3
    replication: int = -1  # -1: the broker's default.replication.factor
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
        if self.format == "raw" and self.shape.envelope != "none":
            raise ValueError("--envelope maps bodies to CloudEvents: it needs --kafka-format binary or structured, "
                             "not raw")
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
            raise ValueError("Kafka replication must be at least 1 (or -1: the broker's default), "
                             f"not {self.replication}")
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
        """A record waits at most ``message.timeout.ms`` for room in librdkafka's queue (in the
        channel's own, off the loop), then at most ``message.timeout.ms`` for the broker."""
        return 2 * _message_timeout(self.producer_config())

    def create(self, source: str) -> KafkaChannel:
        from channels.kafka.channel import KafkaChannel  # the channel imports this module

        return KafkaChannel(self, source)


def _pairs(value: Any, what: str) -> tuple[tuple[str, str], ...]:
    items = value.items() if isinstance(value, Mapping) else value
    try:
        return tuple((str(k), str(v)) for k, v in items)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be (key, value) pairs") from None


def _kafka_error(exc: BaseException) -> KafkaError | None:
    """The ``KafkaError`` a ``KafkaException`` carries, or None (any other exception, or none given)."""
    err = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
    return err if isinstance(err, KafkaError) else None


def _error_text(exc: KafkaException) -> str:
    err = _kafka_error(exc)
    return err.str() if err is not None else str(exc)


def _message_timeout(conf: Mapping[str, Any]) -> float:
    """``message.timeout.ms`` in seconds: the longest a record may wait in the local queue."""
    try:
        ms = int(conf.get("message.timeout.ms", 300_000))
    except (TypeError, ValueError):
        ms = 300_000
    return ms / 1000 if ms > 0 else 300.0  # 0 = no limit in librdkafka; do not wait forever here

