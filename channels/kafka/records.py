"""Records: what ``Producer.produce`` gets for one SQS message (see the package docstring)."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any, TypeAlias

from channels.base import Message
from channels.events import EventError, EventFormat, is_event_format
from channels.kafka.config import KafkaConfig

__all__ = ["STRUCTURED_CONTENT_TYPE", "Record", "RecordBuilder", "attribute_headers", "attribute_value",
           "sent_timestamp"]

STRUCTURED_CONTENT_TYPE = b"application/cloudevents+json"

# A header as Producer.produce types it: its list is invariant, so ours are this (values are bytes).
Header: TypeAlias = tuple[str, str | bytes | None]


class Record:
    """What ``Producer.produce`` gets for one message. ``timestamp`` 0 = the producer's clock.
    (A plain class: one is made per message. Compiled (setup.py), it is made in ~0.35 us; a named
    tuple's generated ``__new__`` stays interpreted, ~0.5 us, and a frozen dataclass's is slower.)"""

    __slots__ = ("headers", "key", "timestamp", "value")

    def __init__(self, value: bytes, key: bytes | None, headers: list[Header], timestamp: int) -> None:
        self.value = value
        self.key = key
        self.headers = headers
        self.timestamp = timestamp


class RecordBuilder:
    """Builds records for one queue; pure, no broker needed."""

    __slots__ = ("_constant", "_event", "_format", "_key_attribute", "_key_mode", "_sent_time")

    def __init__(self, config: KafkaConfig, source: str) -> None:
        self._event = EventFormat(source, config.data_mode, dict(config.overrides), config.shape)
        self._format = config.format
        self._key_mode, _, self._key_attribute = config.key.partition(":")
        self._sent_time = config.timestamp == "sent"
        # binary: the ce_ headers that are the same for every record (specversion, source, type,
        # the overrides), encoded once; each record adds its own (id, time, extensions).
        self._constant: list[Header] = [("ce_" + name, value.encode())
                                        for name, value in self._event.constant_attributes().items()]

    @property
    def events(self) -> EventFormat:
        return self._event

    def build(self, message: Message) -> Record:
        """Raises ``EventError`` when the message cannot be made a record of this format."""
        headers: list[Header]
        if self._format == "binary":
            value, content_type = self._event.data(message)
            headers = self._constant.copy()
            headers += [("ce_" + name, v.encode()) for name, v in self._event.per_message_attributes(message).items()]
            headers.append(("content-type", content_type.encode()))
            if message.message_attributes:
                headers += attribute_headers(message, cloudevents=True)
        elif self._format == "structured":
            value = self._event.structured(message)
            headers = [("content-type", STRUCTURED_CONTENT_TYPE)]
            if message.message_attributes:
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


def attribute_headers(message: Message, *, cloudevents: bool) -> list[Header]:
    """Message attributes as Kafka headers (see the module docstring for the mapping)."""
    headers: list[Header] = []
    for name, attribute in message.message_attributes.items():
        lowered = name.lower()
        if cloudevents and (lowered == "content-type" or lowered.startswith("ce_")):
            continue
        if lowered.startswith("ce_"):
            # raw: with ce_* headers a CloudEvents reader takes the record for a binary-mode event
            # (Kafka binding 3.2.3) whose id, source and type the sender chose.
            raise EventError(f"attribute {name[:40]!r} would make a reader take the record for an event "
                             "of the sender's making: refused")
        value = attribute_value(name, attribute)
        if lowered == "content-type" and is_event_format(value.decode("utf-8", "replace")):
            # raw: a CloudEvents reader would take the body for a whole event of the sender's
            # making (Kafka binding 3.2: this content type marks structured mode).
            raise EventError(f"content-type attribute {value[:80]!r} would make a reader take the body "
                             "for an event of its own: refused")
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

