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

Message attributes become extension attributes where the name is a valid extension name
(``[a-z0-9]{1,20}``, not a spec attribute), or becomes one in lower case (``TraceId`` ->
``traceid``; a name valid as it is wins over one lowered to it), and the type is String or Number
(including custom ``String.x`` / ``Number.x`` types); the value is the string value. Any other
attribute is not mapped (it stays in ``data`` with ``data=message``); a name that cannot be
forwarded is logged once. Tracing (``channels.tracing``): a valid ``traceparent`` attribute (and
``tracestate``) is kept, an invalid one dropped, and without one SQS's ``AWSTraceHeader`` becomes
``traceparent``. Overrides (Knative's ``K_CE_OVERRIDES`` extensions) are applied last.

``EventShape`` (``--ce-type``, ``--ce-source``, ``--envelope``): a static type and source instead
of ``aws.sqs.message`` and the queue URL; with an envelope, bodies shaped like an SNS
notification, an EventBridge event or an S3 notification become the events they describe
(``channels.envelopes``; the channel publishes what ``unwrap`` gives it). With ``data=body`` and
no ``content-type`` attribute, a body that is a JSON object or array is ``application/json``.

Hand-written rather than built with the ``cloudevents`` SDK: on the hot path the SDK's event
objects cost several times this dictionary work per message; the tests use the SDK to parse what
we produce, as the independent judge.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import quote

import orjson
from mypy_extensions import mypyc_attr

from channels.base import Message, Report
from channels.envelopes import ENVELOPES, Part, json_document, kinds_of, unwrap
from channels.tracing import traceparent_from_xray, valid_traceparent, valid_tracestate

__all__ = ["EVENT_TYPE", "EventError", "EventFormat", "EventShape", "check_content_type", "is_event_format",
           "is_extension_name", "parse_overrides"]

log = logging.getLogger(__name__)

EVENT_TYPE = "aws.sqs.message"
SPEC_ATTRIBUTES = frozenset(
    {"specversion", "id", "source", "type", "datacontenttype", "dataschema", "subject", "time",
     "data", "data_base64"}
)
DATA_MODES = ("message", "body")

_EXTENSION_NAME = re.compile(r"[a-z0-9]{1,20}")
_NAMES_KEPT = 1024  # attribute names remembered (and logged once) per queue; the rest are checked each time
_UNKNOWN = ""  # not an extension name: marks a name not looked at yet
_STATIC_VALUE = re.compile(r"[^\x00-\x1f\x7f]{1,1024}")
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


# Compiled, f"{ms:03d}Z" parses its format spec on every call: ~3% of a worker's CPU into Kafka
# (perf, a drain from LocalStack). A lookup instead.
_MILLIS_Z = tuple(f"{ms:03d}Z" for ms in range(1000))


def rfc3339_from_millis(millis: str) -> str:
    seconds, ms = divmod(int(millis), 1000)
    return _rfc3339_second(seconds) + _MILLIS_Z[ms]


@functools.lru_cache(maxsize=4096)
def _rfc3339_second(seconds: int) -> str:
    # Messages of a batch were mostly sent within the same seconds: strftime was ~a third of the
    # cost of building an event's headers (profiled in benchmarks/).
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.")


# Compiled with mypyc (setup.py), a frozen dataclass does not unpickle (its __setattr__ refuses the
# fields); the configs the supervisor hands its workers are pickled: this one stays a Python class.
@mypyc_attr(native_class=False)
@dataclass(frozen=True, slots=True)
class EventShape:
    """What the events' ``type`` and ``source`` are (``--ce-type``, ``--ce-source``; empty: the
    defaults) and which envelopes a body may have (``--envelope``, ``channels.envelopes``)."""

    envelope: str = "none"
    type: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        if self.envelope not in ENVELOPES:
            raise ValueError(f"--envelope must be one of {', '.join(ENVELOPES)}, not {self.envelope!r}")
        for flag, value in (("--ce-type", self.type), ("--ce-source", self.source)):
            if value and not _STATIC_VALUE.fullmatch(value):
                raise ValueError(f"{flag} must be 1 to 1024 characters without control characters")


@dataclass(frozen=True, slots=True)
class EventFormat:
    """How messages of one queue become events."""

    source: str
    data_mode: str = "message"
    overrides: Mapping[str, str] = field(default_factory=dict)
    shape: EventShape = field(default_factory=EventShape)
    event_type: str = field(init=False, default=EVENT_TYPE)
    # The envelopes bodies may have; empty: none (every message is one event of its own).
    kinds: frozenset[str] = field(init=False, default=frozenset())
    # Attribute name -> its extension name, or None: cannot be forwarded (logged once).
    _names: dict[str, str | None] = field(init=False, default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.data_mode not in DATA_MODES:
            raise ValueError(f"data mode must be one of {', '.join(DATA_MODES)}, not {self.data_mode!r}")
        if self.shape.type:
            object.__setattr__(self, "event_type", self.shape.type)
        if self.shape.source:
            object.__setattr__(self, "source", self.shape.source)
        if self.shape.envelope != "none":
            object.__setattr__(self, "kinds", kinds_of(self.shape.envelope))

    def unwrap(self, batch: Sequence[Message], report: Report) -> tuple[Sequence[Message], Report]:
        """What the channel publishes for ``batch``, and the report to give with it: with an
        envelope, the events of the messages that have one (``channels.envelopes.unwrap``)."""
        if not self.kinds:
            return batch, report
        return unwrap(batch, report, self.kinds)

    def attributes(self, message: Message) -> dict[str, str]:
        """The event's context attributes and extensions, without ``data``/``datacontenttype``."""
        attrs = {"specversion": "1.0"}
        if type(message) is Part:
            self._add_event(attrs, message)
        else:
            attrs.update(id=message.id, source=self.source, type=self.event_type)
            self._add_message_attributes(attrs, message)
        if self.overrides:
            attrs.update(self.overrides)
        return attrs

    def constant_attributes(self) -> dict[str, str]:
        """The attributes that are the same for every message: specversion, source and type
        (unless bodies may decide them: an envelope) and the overrides. ``attributes()`` is these
        plus ``per_message_attributes()``."""
        if self.kinds:
            return {"specversion": "1.0", **self.overrides}
        return {"specversion": "1.0", "source": self.source, "type": self.event_type, **self.overrides}

    def per_message_attributes(self, message: Message) -> dict[str, str]:
        """The attributes of this message that no override replaces: id, time, extensions (and
        source and type with an envelope)."""
        attrs: dict[str, str] = {}
        if type(message) is Part:
            self._add_event(attrs, message)
        elif self.kinds:
            attrs.update(id=message.id, source=self.source, type=self.event_type)
            self._add_message_attributes(attrs, message)
        else:
            attrs["id"] = message.id
            self._add_message_attributes(attrs, message)
        if self.overrides:
            for name in self.overrides:
                attrs.pop(name, None)
        return attrs

    def _add_event(self, attrs: dict[str, str], part: Part) -> None:
        """An envelope's event: its mapped attributes, then the message's extensions."""
        event = part.event
        attrs.update(id=event.id, source=event.source, type=event.type)
        if event.subject is not None:
            attrs["subject"] = event.subject
        if event.time is not None:
            attrs["time"] = event.time  # RFC 3339 by channels.envelopes' check: safe as a header
        for name, value in event.attributes.items():
            extension = self._extension(name)
            if extension is not None:
                self._put(attrs, extension, name, value)
        self._add_extensions(attrs, part)

    def _add_message_attributes(self, attrs: dict[str, str], message: Message) -> None:
        sent = message.attributes.get("SentTimestamp")
        if sent:
            try:
                attrs["time"] = rfc3339_from_millis(sent)
            except (ValueError, OverflowError, OSError):
                raise EventError(f"SentTimestamp {sent!r} is not a timestamp") from None
        self._add_extensions(attrs, message)

    def _add_extensions(self, attrs: dict[str, str], message: Message) -> None:
        names = self._names
        for name, value in message.message_attributes.items():
            extension = names.get(name, _UNKNOWN)
            if extension is _UNKNOWN:
                extension = self._extension(name)
            if extension is not None and value.get("DataType", "").startswith(("String", "Number")):
                self._put(attrs, extension, name, value.get("StringValue", ""))
        self._add_trace(attrs, message)

    @staticmethod
    def _put(attrs: dict[str, str], extension: str, name: str, value: str) -> None:
        if extension == name:
            attrs[extension] = value
        else:  # lowered: a name valid as it is wins
            attrs.setdefault(extension, value)

    def _extension(self, name: str) -> str | None:
        """The extension name an attribute goes by, or None (logged once per name)."""
        names = self._names
        if name in names:
            return names[name]
        extension: str | None = name
        if not is_extension_name(name):
            lowered = name.lower()
            extension = lowered if is_extension_name(lowered) else None
        if len(names) < _NAMES_KEPT:
            names[name] = extension
            if extension is None and name.lower() != "content-type":  # content-type: the data's own
                log.info("message attribute %r is not forwarded as an event attribute: its name is not a "
                         "CloudEvents extension name ([a-z0-9]{1,20}, not a spec attribute) even in lower "
                         "case (logged once per name)", name[:64])
        return extension

    @staticmethod
    def _add_trace(attrs: dict[str, str], message: Message) -> None:
        """A valid traceparent attribute wins; else AWSTraceHeader's (``channels.tracing``)."""
        parent = attrs.get("traceparent")
        if parent is not None and not valid_traceparent(parent):
            del attrs["traceparent"]
            parent = None
        if parent is None:
            attrs.pop("tracestate", None)
            header = message.attributes.get("AWSTraceHeader")
            if header:
                converted = traceparent_from_xray(header)
                if converted is not None:
                    attrs["traceparent"] = converted
        elif "tracestate" in attrs and not valid_tracestate(attrs["tracestate"]):
            del attrs["tracestate"]

    def data(self, message: Message) -> tuple[bytes, str]:
        """The event's data as bytes, and its content type."""
        if type(message) is Part:
            return message.event.data, message.event.content_type
        if self.data_mode == "message":
            return orjson.dumps(message_document(message)), "application/json"
        return message.body.encode(), self.body_content_type(message)

    @staticmethod
    def body_content_type(message: Message) -> str:
        declared = _declared_content_type(message)
        if declared is not None:
            return declared
        return "application/json" if json_document(message.body) is not None else "text/plain"

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
            # ce-time is ours (digits, "-", ":", ".", "T", "Z") or an envelope's, checked to be
            # RFC 3339 (the same characters, "+"): nothing to percent-encode.
            parts.append(f"ce-{name}: {value if name == 'time' else _header_value(value)}\r\n")
        return "".join(parts).encode("ascii"), body

    def structured(self, message: Message) -> bytes:
        """Structured mode: the whole event as one JSON document."""
        event: dict[str, object] = dict(self.attributes(message))
        if type(message) is Part:
            event["datacontenttype"] = message.event.content_type
            event["data"] = message.event.document
        elif self.data_mode == "message":
            event["datacontenttype"] = "application/json"
            event["data"] = message_document(message)
        else:
            content_type = _declared_content_type(message)
            if content_type is None:
                document = json_document(message.body)
                event["datacontenttype"] = "text/plain" if document is None else "application/json"
                event["data"] = message.body if document is None else document
            else:
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


def _declared_content_type(message: Message) -> str | None:
    """The ``content-type`` message attribute, checked (``check_content_type``), or None."""
    for name, value in message.message_attributes.items():
        if name.lower() == "content-type":
            return check_content_type(str(value.get("StringValue", "")))
    return None


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")
