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

Never blocking the worker's loop: ``publish`` runs on it. A record that finds librdkafka's local
queue full (``queue.buffering.max.messages`` / ``.kbytes``; ``produce`` raises ``BufferError``)
waits in the channel's own queue, in order, and the poll thread moves it over as deliveries make
room; after ``message.timeout.ms`` of waiting it is reported RETRY, and when the worker's circuit
opens (``shed``) at once. So a full queue is back-pressure, not a stall: the loop keeps sending
heartbeats and extending visibility.

A stuck producer (``progress.py``): when records keep failing with timeouts or idempotence errors
while the broker answers metadata requests (a broker that lost its state: tansu restarted on
memory storage, a cluster replaced behind the same address), the poll thread makes a new producer
(a new producer id), purges the old one and reports what it held RETRY, once; the worker sends
those again through the new one. A producer that librdkafka declares fatal, or that the broker
fences, still fails the channel, and the worker process is replaced.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from channels.kafka.channel import KafkaChannel
    from channels.kafka.config import (
        AUTH_MODES,
        DEFAULTS,
        FORMATS,
        TIMESTAMPS,
        KafkaConfig,
        parse_kafka_config,
        parse_kafka_config_env,
    )
    from channels.kafka.msk import msk_oauth_callback
    from channels.kafka.records import Record, RecordBuilder

# Imported on first use, not with the package: the poller imports channels.kafka.plugin (the
# channel's options) for every --help, and that must not cost confluent-kafka's import.
_HOME = {
    "KafkaChannel": "channel",
    "AUTH_MODES": "config", "DEFAULTS": "config", "FORMATS": "config", "TIMESTAMPS": "config",
    "KafkaConfig": "config", "parse_kafka_config": "config", "parse_kafka_config_env": "config",
    "msk_oauth_callback": "msk", "Record": "records", "RecordBuilder": "records",
}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)


__all__ = [
    "AUTH_MODES",
    "DEFAULTS",
    "FORMATS",
    "TIMESTAMPS",
    "KafkaChannel",
    "KafkaConfig",
    "Record",
    "RecordBuilder",
    "msk_oauth_callback",
    "parse_kafka_config",
    "parse_kafka_config_env",
]
