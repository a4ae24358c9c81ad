"""Events shaped like their source: SNS notifications, EventBridge events and S3 event
notifications that arrive as an SQS message's body (``--envelope``).

With ``envelope="none"`` (the default) nothing here runs. Otherwise a body that has exactly one of
these shapes (as AWS documents them) becomes the event(s) it describes, and anything else passes
unchanged, as with ``none``:

=================  ========================================================================
SNS notification   ``Type`` = ``Notification`` (raw delivery off). id = ``MessageId``, source =
                   ``TopicArn``, type = ``com.amazonaws.sns.notification``, subject =
                   ``Subject``, time = ``Timestamp``, data = ``Message`` (``application/json``
                   when it is a JSON object or array, else ``text/plain``); the notification's
                   ``MessageAttributes`` (String and Number types) become extensions, named as
                   SQS message attributes are.
EventBridge event  id = ``id``, source = ``source``, type = ``detail-type``, time = ``time``,
                   subject = ``resources[0]``, data = ``detail`` (``application/json``):
                   EventBridge's own CloudEvents mapping (its input transformer for API
                   destinations).
S3 notification    one event per record: id = ``<sequencer>:<eventName>:<key>`` (stable across
                   redeliveries, so a sink can drop duplicates; ``<SQS message id>:<index>`` for
                   a record without a sequencer), source = the bucket's ARN, type =
                   ``com.amazonaws.s3.`` + ``eventName``, subject = the object key (as S3 sends
                   it, URL-encoded), time = ``eventTime``, data = the record
                   (``application/json``). ``s3:TestEvent`` is acknowledged with a log line and
                   becomes no event.
=================  ========================================================================

Trust: with an envelope the body decides ``id``, ``source``, ``type``, ``subject`` and ``time``:
that is the point, and why it is opt-in: it trusts whoever may send to the queue. A body sets
nothing beyond this mapping: no other attribute, no extension of its own (SNS message attributes
keep the SQS attributes' naming rules), and never the content type (always ``application/json``
or ``text/plain``). A ``time`` that is not RFC 3339 is left out rather than forwarded.

A message of N events (S3) is acknowledged once every one of its events was: the channel
publishes ``Part`` messages and ``unwrap``'s report gathers their outcomes: any REJECT rejects
the message, else any RETRY retries it (all of its events are sent again: at least once).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from mypy_extensions import mypyc_attr

from channels.base import Message, Outcome, Report

__all__ = ["ENVELOPES", "Mapped", "Part", "json_document", "recognise", "unwrap"]

ENVELOPES = ("none", "auto", "sns", "eventbridge", "s3")
SNS_TYPE = "com.amazonaws.sns.notification"
S3_TYPE_PREFIX = "com.amazonaws.s3."

log = logging.getLogger(__name__)

_JSON_START = re.compile(r"\s*[{\[]")
# RFC 3339 with a time zone; fullmatch: the value may go into a header as it is.
_RFC3339 = re.compile(r"\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(?:\.\d{1,9})?(?:[Zz]|[+-]\d\d:\d\d)")


@dataclass(slots=True)
class Mapped:
    """One event a body describes: its context attributes and data, nothing else."""

    id: str
    source: str
    type: str
    data: bytes
    content_type: str  # application/json or text/plain: never the body's choice
    document: Any  # data for structured mode: parsed JSON, or the text
    subject: str | None = None
    time: str | None = None
    # Extension candidates by their original names (SNS message attributes), String/Number only.
    attributes: Mapping[str, str] = field(default_factory=dict)


_RANK = {Outcome.ACK: 0, Outcome.RETRY: 1, Outcome.REJECT: 2}


class _Gather:
    """The outcomes of one message's events, reported as one once all are in."""

    __slots__ = ("left", "outcome", "reason", "retry_after")

    def __init__(self, count: int) -> None:
        self.left = count
        self.outcome = Outcome.ACK
        self.reason = ""
        self.retry_after = 0.0

    def add(self, outcome: Outcome, reason: str, retry_after: float) -> bool:
        """True once every event reported. REJECT outranks RETRY outranks ACK."""
        self.left -= 1
        if _RANK[outcome] > _RANK[self.outcome]:  # the first reason of the worst outcome
            self.outcome, self.reason = outcome, reason
        self.retry_after = max(self.retry_after, retry_after)
        return self.left == 0


@mypyc_attr(native_class=False)  # compiled (setup.py), it could not extend Message, a Python class
@dataclass(slots=True, eq=False)
class Part(Message):
    """One event of a message with an envelope, as the channel sees it: ``id`` is the event's, the
    rest the message's (its group, attributes and ``ack_id``); reports go to ``origin``."""

    origin: Message = field(default=None, repr=False)  # type: ignore[assignment]
    event: Mapped = field(default=None)  # type: ignore[assignment]
    gather: _Gather | None = field(default=None, repr=False)


def json_document(text: str) -> Any:
    """``text`` parsed, if it is a JSON object or array, else None. Cheap for anything else: only
    a text whose first non-space character is ``{`` or ``[`` is parsed at all."""
    head = text[:1]
    if head != "{" and head != "[" and not (head.isspace() and _JSON_START.match(text)):
        return None
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return None


def recognise(message: Message, kinds: frozenset[str]) -> list[Mapped] | None:
    """The events ``message``'s body describes, if it has one of the shapes in ``kinds``; None:
    not an envelope (it passes unchanged); an empty list: an S3 test event (nothing to send)."""
    doc = json_document(message.body)
    if not isinstance(doc, dict):
        return None
    if "sns" in kinds and doc.get("Type") == "Notification":
        event = _sns(doc)
        return None if event is None else [event]
    if "eventbridge" in kinds and "detail-type" in doc:
        event = _eventbridge(doc)
        return None if event is None else [event]
    if "s3" in kinds:
        if doc.get("Event") == "s3:TestEvent" and doc.get("Service") == "Amazon S3":
            return []
        if "Records" in doc:
            return _s3(doc, message.id)
    return None


def kinds_of(envelope: str) -> frozenset[str]:
    return frozenset(("sns", "eventbridge", "s3")) if envelope == "auto" else frozenset((envelope,))


def unwrap(batch: Sequence[Message], report: Report, kinds: frozenset[str]) -> tuple[list[Message], Report]:
    """The messages to publish for ``batch``: its messages with an envelope replaced by their
    events (``Part``), the rest unchanged; and the report to give the channel, which reports each
    message once, when all its events have reported. An S3 test event is acknowledged here."""
    out: list[Message] = []
    for message in batch:
        events = recognise(message, kinds)
        if events is None:
            out.append(message)
        elif not events:
            log.info("message %s is an S3 test event (s3:TestEvent): acknowledged, no event sent", message.id)
            report(message, Outcome.ACK, "")
        else:
            gather = _Gather(len(events)) if len(events) > 1 else None
            out.extend(Part(id=event.id, body=message.body, ack_id=message.ack_id, attributes=message.attributes,
                            message_attributes=message.message_attributes, md5_of_body=message.md5_of_body,
                            origin=message, event=event, gather=gather)
                       for event in events)

    def gathered(message: Message, outcome: Outcome, reason: str = "", retry_after: float = 0.0, /) -> None:
        if type(message) is not Part:
            report(message, outcome, reason, retry_after)
        elif message.gather is None:
            report(message.origin, outcome, reason, retry_after)
        elif message.gather.add(outcome, f"event {message.id}: {reason}" if reason else "", retry_after):
            gather = message.gather
            report(message.origin, gather.outcome, gather.reason, gather.retry_after)

    return out, gathered


# -- the shapes ---------------------------------------------------------------------------------


def _text(value: Any) -> str | None:
    """A non-empty string, else None."""
    return value if isinstance(value, str) and value else None


def _time(value: Any) -> str | None:
    """An RFC 3339 timestamp that is a real date, else None (left out of the event)."""
    if not isinstance(value, str) or not _RFC3339.fullmatch(value):
        return None
    try:
        datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    except ValueError:
        return None
    return value


def _sns(doc: dict[str, Any]) -> Mapped | None:
    message_id, topic, text = _text(doc.get("MessageId")), _text(doc.get("TopicArn")), doc.get("Message")
    if message_id is None or topic is None or not isinstance(text, str) or not topic.startswith("arn:"):
        return None
    subject = doc.get("Subject")
    attributes: dict[str, str] = {}
    raw = doc.get("MessageAttributes")
    if isinstance(raw, dict):
        for name, attribute in raw.items():
            if not isinstance(attribute, dict):
                continue
            kind, value = attribute.get("Type"), attribute.get("Value")
            if isinstance(kind, str) and kind.startswith(("String", "Number")) and isinstance(value, str):
                attributes[name] = value
    parsed = json_document(text)
    return Mapped(id=message_id, source=topic, type=SNS_TYPE, data=text.encode(),
                  content_type="text/plain" if parsed is None else "application/json",
                  document=text if parsed is None else parsed,
                  subject=subject if isinstance(subject, str) and subject else None,
                  time=_time(doc.get("Timestamp")), attributes=attributes)


def _eventbridge(doc: dict[str, Any]) -> Mapped | None:
    event_id, source, kind = _text(doc.get("id")), _text(doc.get("source")), _text(doc.get("detail-type"))
    resources, detail = doc.get("resources"), doc.get("detail")
    if (event_id is None or source is None or kind is None or not isinstance(resources, list)
            or "detail" not in doc or not isinstance(doc.get("version"), str) or "time" not in doc):
        return None
    subject = resources[0] if resources and isinstance(resources[0], str) and resources[0] else None
    return Mapped(id=event_id, source=source, type=kind, data=orjson.dumps(detail),
                  content_type="application/json", document=detail, subject=subject, time=_time(doc.get("time")))


def _s3(doc: dict[str, Any], message_id: str) -> list[Mapped] | None:
    records = doc.get("Records")
    if not isinstance(records, list) or not records:
        return None
    events = []
    for index, record in enumerate(records):
        event = _s3_record(record, message_id, index)
        if event is None:  # not every record is S3's: not this shape, the message passes unchanged
            return None
        events.append(event)
    return events


def _s3_record(record: Any, message_id: str, index: int) -> Mapped | None:
    if not isinstance(record, dict) or record.get("eventSource") != "aws:s3":
        return None
    s3 = record.get("s3")
    bucket = s3.get("bucket") if isinstance(s3, dict) else None
    obj = s3.get("object") if isinstance(s3, dict) else None
    if not isinstance(bucket, dict) or not isinstance(obj, dict):
        return None
    name, arn, key = _text(record.get("eventName")), _text(bucket.get("arn")), _text(obj.get("key"))
    if name is None or arn is None or key is None or not arn.startswith("arn:"):
        return None
    sequencer = _text(obj.get("sequencer"))
    event_id = f"{sequencer}:{name}:{key}" if sequencer else f"{message_id}:{index}"
    return Mapped(id=event_id, source=arn, type=S3_TYPE_PREFIX + name, data=orjson.dumps(record),
                  content_type="application/json", document=record, subject=key,
                  time=_time(record.get("eventTime")))
