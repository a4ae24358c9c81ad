"""Turning a message into a CloudEvent (spec 1.0), shared by the HTTP and Kafka channels.

The mapping follows Knative's ``AwsSqsSource`` receive adapter:

==================  =============================================================
``id``              the SQS ``MessageId``
``source``          the queue URL
``type``            ``aws.sqs.message``
``time``            ``SentTimestamp`` as RFC 3339 (UTC, milliseconds)
``specversion``     ``1.0``
``datacontenttype`` ``application/json`` for ``data=message``; for ``data=body`` the
                    ``content-type`` message attribute if there is one (never an
                    ``application/cloudevents*`` one: ``check_content_type``), else
                    ``text/plain``
data                ``data=message``: the message as JSON (``MessageId``, ``Body``,
                    ``Attributes``, ``MessageAttributes``, ``MD5OfBody``; never the
                    receipt handle, which would let a subscriber delete it);
                    ``data=body``: the raw ``Body``
==================  =============================================================

Message attributes become extension attributes only where the name is already a valid
extension name (``[a-z0-9]{1,20}``, not a spec attribute) and the type is String or Number
(including custom ``String.x`` / ``Number.x`` types); the value is the string value. Any other
attribute is not mapped (it stays in ``data`` with ``data=message``). Overrides
(Knative's ``K_CE_OVERRIDES`` extensions) are applied last.

Hand-written rather than built with the ``cloudevents`` SDK: on the hot path the SDK's event
objects cost several times this dictionary work per message; the tests use the SDK to parse what
we produce, as the independent judge.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import quote

import orjson

from channels.base import Message

__all__ = ["EVENT_TYPE", "EventError", "EventFormat", "check_content_type", "is_event_format", "is_extension_name",
           "parse_overrides"]

EVENT_TYPE = "aws.sqs.message"
SPEC_ATTRIBUTES = frozenset(
    {"specversion", "id", "source", "type", "datacontenttype", "dataschema", "subject", "time",
     "data", "data_base64"}
)
DATA_MODES = ("message", "body")

_EXTENSION_NAME = re.compile(r"[a-z0-9]{1,20}")
# ASCII only: it becomes the Content-Type header, which http.client encodes as latin-1 and
# refuses with CR/LF; parameters are printable ASCII, spaces and tabs.
_MEDIA_TYPE = re.compile(r"[\w.+-]+/[\w.+-]+(?:[ \t]*;[\t\x20-\x7e]*)?", re.ASCII)
# HTTP binding 3.1.3.2: space, '"', '%' and anything outside U+0021-U+007E are percent-encoded.
_HEADER_UNSAFE = re.compile(r'[^\x21-\x7e]|["%]')
_HEADER_SAFE_CHARS = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"%')


class EventError(ValueError):
    """This message cannot be made a CloudEvent; the channel rejects it (one line reason)."""


def check_content_type(content_type: str) -> str:
    """A ``content-type`` message attribute that may become a content type we send; else EventError.

    Untrusted: anyone who may send to the queue writes it. Besides being a well-formed ASCII media
    type, it must not be an event format of its own (``application/cloudevents``, any suffix,
    case or parameters): a receiver that follows the CloudEvents HTTP binding (3.3: the
    ``application/cloudevents`` prefix marks structured and batched mode) or the Kafka binding
    (3.1) would read the body as the whole event, and the sender, not the queue, would choose its
    id, source and type."""
    if not _MEDIA_TYPE.fullmatch(content_type):
        raise EventError(f"content-type attribute {content_type!r} is not a media type")
    if is_event_format(content_type):
        raise EventError(f"content-type attribute {content_type!r} would make the receiver read the body "
                         "as an event of its own (its id, source and type chosen by the sender): refused")
    return content_type


def is_event_format(content_type: str) -> bool:
    """The content type says the body is a whole CloudEvent (or a batch of them)."""
    return content_type.split(";", 1)[0].strip().lower().startswith("application/cloudevents")


def is_extension_name(name: str) -> bool:
    return bool(_EXTENSION_NAME.fullmatch(name)) and name not in SPEC_ATTRIBUTES


def parse_overrides(text: str | None) -> dict[str, str]:
    """Parse Knative's ``K_CE_OVERRIDES`` (``{"extensions": {"name": "value"}}``)."""
    if not text:
        return {}
    try:
        doc = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"K_CE_OVERRIDES is not valid JSON: {exc}") from None
    extensions = doc.get("extensions", {}) if isinstance(doc, dict) else None
    if not isinstance(extensions, dict):
        raise ValueError('K_CE_OVERRIDES must look like {"extensions": {"name": "value"}}')
    unknown = sorted(set(doc) - {"extensions"})
    if unknown:  # {"team": "a"} without the wrapper would otherwise be accepted and ignored
        raise ValueError(f'K_CE_OVERRIDES must look like {{"extensions": {{"name": "value"}}}}: '
                         f'{unknown[0]!r} is not inside "extensions"')
    for name, value in extensions.items():
        if not is_extension_name(name):
            raise ValueError(f"K_CE_OVERRIDES: {name!r} is not a valid CloudEvents extension name")
        if not isinstance(value, str):
            raise ValueError(f"K_CE_OVERRIDES: the value of {name!r} must be a string")
    return dict(extensions)


def rfc3339_from_millis(millis: str) -> str:
    seconds, ms = divmod(int(millis), 1000)
    return _rfc3339_second(seconds) + f"{ms:03d}Z"


@functools.lru_cache(maxsize=4096)
def _rfc3339_second(seconds: int) -> str:
    # Messages of a batch were mostly sent within the same seconds: strftime was ~a third of the
    # cost of building an event's headers (profiled in benchmarks/).
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.")


@dataclass(frozen=True, slots=True)
class EventFormat:
    """How messages of one queue become events."""

    source: str
    data_mode: str = "message"
    overrides: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.data_mode not in DATA_MODES:
            raise ValueError(f"data mode must be one of {', '.join(DATA_MODES)}, not {self.data_mode!r}")

    def attributes(self, message: Message) -> dict[str, str]:
        """The event's context attributes and extensions, without ``data``/``datacontenttype``."""
        attrs = {"specversion": "1.0", "id": message.id, "source": self.source, "type": EVENT_TYPE}
        self._add_message_attributes(attrs, message)
        if self.overrides:
            attrs.update(self.overrides)
        return attrs

    def constant_attributes(self) -> dict[str, str]:
        """The attributes that are the same for every message: specversion, source, type and the
        overrides. ``attributes()`` is these plus ``per_message_attributes()``."""
        return {"specversion": "1.0", "source": self.source, "type": EVENT_TYPE, **self.overrides}

    def per_message_attributes(self, message: Message) -> dict[str, str]:
        """The attributes of this message that no override replaces: id, time, extensions."""
        attrs = {"id": message.id}
        self._add_message_attributes(attrs, message)
        if self.overrides:
            for name in self.overrides:
                attrs.pop(name, None)
        return attrs

    def _add_message_attributes(self, attrs: dict[str, str], message: Message) -> None:
        sent = message.attributes.get("SentTimestamp")
        if sent:
            try:
                attrs["time"] = rfc3339_from_millis(sent)
            except (ValueError, OverflowError, OSError):
                raise EventError(f"SentTimestamp {sent!r} is not a timestamp") from None
        for name, value in message.message_attributes.items():
            if is_extension_name(name) and value.get("DataType", "").startswith(("String", "Number")):
                attrs[name] = value.get("StringValue", "")

    def data(self, message: Message) -> tuple[bytes, str]:
        """The event's data as bytes, and its content type."""
        if self.data_mode == "message":
            return orjson.dumps(message_document(message)), "application/json"
        return message.body.encode(), self.body_content_type(message)

    @staticmethod
    def body_content_type(message: Message) -> str:
        for name, value in message.message_attributes.items():
            if name.lower() == "content-type":
                return check_content_type(str(value.get("StringValue", "")))
        return "text/plain"

    def http_binary(self, message: Message) -> tuple[dict[str, str], bytes]:
        """HTTP binary mode: ``ce-*`` headers and the data as body."""
        headers, body = self.http_binary_message(message)
        return {**dict(headers[:1]), **self.http_binary_constant(), **dict(headers[1:])}, body

    def http_binary_constant(self) -> dict[str, str]:
        """The ``ce-*`` headers of ``http_binary`` that are the same for every message, so that a
        sender encodes them once: ``ce-specversion``, ``ce-source``, ``ce-type``, the overrides."""
        return {"ce-" + name: _header_value(value) for name, value in self.constant_attributes().items()}

    def http_binary_message(self, message: Message) -> tuple[list[tuple[str, str]], bytes]:
        """The rest of ``http_binary``, per message: ``Content-Type``, ``ce-id``, ``ce-time`` and
        the extensions (as name/value pairs), and the body."""
        body, content_type = self.data(message)
        headers = [("Content-Type", content_type)]
        for name, value in self.per_message_attributes(message).items():
            headers.append(("ce-" + name, _header_value(value)))
        return headers, body

    def http_binary_head(self, message: Message) -> tuple[bytes, bytes]:
        """``http_binary_message`` as the encoded header block and the body, for the hot path.

        Safe as it is, with no check of its own: names are ``ce-`` and valid extension names,
        values are percent-encoded to printable ASCII (binding 3.1.3.2), and the content type is
        ``application/json``, ``text/plain`` or a media type ``body_content_type`` validated."""
        body, content_type = self.data(message)
        parts = [f"Content-Type: {content_type}\r\n"]
        for name, value in self.per_message_attributes(message).items():
            # ce-time is ours (digits, "-", ":", ".", "T", "Z"): nothing to percent-encode.
            parts.append(f"ce-{name}: {value if name == 'time' else _header_value(value)}\r\n")
        return "".join(parts).encode("ascii"), body

    def structured(self, message: Message) -> bytes:
        """Structured mode: the whole event as one JSON document."""
        event: dict[str, object] = dict(self.attributes(message))
        if self.data_mode == "message":
            event["datacontenttype"] = "application/json"
            event["data"] = message_document(message)
        else:
            content_type = self.body_content_type(message)
            event["datacontenttype"] = content_type
            if _is_json(content_type):
                try:
                    event["data"] = orjson.loads(message.body)
                except orjson.JSONDecodeError:
                    raise EventError(f"body is not valid JSON but content-type is {content_type}") from None
            else:
                event["data"] = message.body
        return orjson.dumps(event)


def _header_value(value: str) -> str:
    """An attribute value as a header value (HTTP binding 3.1.3.2)."""
    return quote(value, safe=_HEADER_SAFE_CHARS) if _HEADER_UNSAFE.search(value) else value


def message_document(message: Message) -> dict[str, object]:
    """The data of ``data=message`` events: what Knative's message-dumper printed."""
    return {
        "MessageId": message.id,
        "Body": message.body,
        "Attributes": message.attributes,
        "MessageAttributes": message.message_attributes,
        "MD5OfBody": message.md5_of_body,
    }


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")
