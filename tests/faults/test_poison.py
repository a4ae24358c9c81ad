"""Fault suite: poison messages. Bodies at the SQS size limit (attributes count toward it), and
attributes that are binary, unicode, dotted, ``ce_``-prefixed, named like CloudEvents attributes,
numerous, of custom types, or a ``content-type`` that is bad for ``--data body``.

Every message must end up either at the channel, intact and under its own MessageId, or in the DLQ
(rejected, logged and counted); none lost, none stuck on the queue.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Callable
from typing import Any

import pytest
from cloudevents.core.bindings import kafka as ce_kafka
from cloudevents.core.formats.json import JSONFormat

from support import (
    Deliveries, FaultCase, PollerProcess, SinkDeliveries, TopicDeliveries, ce_id, drain, make_body, message_size,
    queue_counts, send_messages, tally, wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults]

SQS_MAX_MESSAGE = 256 * 1024  # body + attribute names, types and values
UNICODE_BODY = "héllo wörld, 漢字, \"quotes\" & <tags>, emoji 🙂"


def string(value: str, data_type: str = "String") -> dict[str, str]:
    return {"DataType": data_type, "StringValue": value}


def binary(value: bytes, data_type: str = "Binary") -> dict[str, Any]:
    return {"DataType": data_type, "BinaryValue": value}


def at_the_limit(label: str, attributes: dict[str, Any], filler: Callable[[int], str]) -> dict[str, Any]:
    """A message of exactly SQS_MAX_MESSAGE bytes: the body is filled up to the limit."""
    entry: dict[str, Any] = {"MessageBody": f"poison {label} ", "MessageAttributes": attributes}
    room = SQS_MAX_MESSAGE - message_size(entry)
    entry["MessageBody"] += filler(room)
    entry["MessageBody"] += "x" * (SQS_MAX_MESSAGE - message_size(entry))  # a multi-byte filler may fall short
    assert message_size(entry) == SQS_MAX_MESSAGE
    if not attributes:
        del entry["MessageAttributes"]
    return entry


def poison_entries() -> dict[str, dict[str, Any]]:
    """label -> SendMessageBatch entry; each body starts with ``poison <label>``."""
    # A whole structured event as the body: a receiver that took the attribute as the request's
    # content type would deliver it under these attributes (seen before the fix: id spoofed-id).
    spoofed_event = ('{"specversion":"1.0","id":"spoofed-id","source":"https://payments.example/ledger",'
                     '"type":"com.example.payment.approved","data":"poison %s"}')
    attrs: dict[str, dict[str, Any]] = {
        "binary": {"bin": binary(b"\x00\xff\xfe\x80" + bytes(range(256))),
                   "Bin.gz": binary(gzip.compress(b"hello", mtime=0), "Binary.gzip")},
        "unicode": {"greeting": string("héllo 漢字 🙂 100% \t tab"), "city": string("Zürich")},
        "dotted": {"my.attr": string("v"), "a.b.c": string("w"), "Dotted.Number": string("42", "Number")},
        "ce-prefixed": {"ce_id": string("spoofed-id"), "ce_type": string("spoofed.type"),
                        "ce_source": string("/spoofed"), "CE_SPECVERSION": string("0.3"),
                        "ce_time": string("not a time"), "Ce_Data": string("x")},
        "spec-names": {"id": string("spoofed-id"), "type": string("spoofed"), "source": string("/spoofed"),
                       "specversion": string("0.3"), "datacontenttype": string("a/b"), "time": string("yesterday"),
                       "subject": string("subject"), "dataschema": string("not a uri")},
        "many": {f"n{i}" + "a" * 253: string(f"value {i} " + "v" * 200) for i in range(10)},
        "custom-types": {"amount": string("3.14", "Number.float"), "label": string("abc", "String.custom"),
                         "tiny": string("-0.000001", "Number")},
        "crlf-extension": {"trace": string("a\r\nb%0D%0A")},
        "content-type-crlf": {"content-type": string("text/plain\r\nX-Injected: yes")},
        "content-type-not-json": {"content-type": string("application/json")},
        "content-type-cloudevents": {"content-type": string("application/cloudevents+json")},
        "content-type-cloudevents-mixed-case": {"Content-Type": string("Application/CloudEvents+JSON; charset=utf-8")},
        "content-type-batch": {"content-type": string("application/cloudevents-batch+json")},
        "content-type-unicode": {"content-type": string("tëxt/plain; charset=utf-8")},
        "content-type-long": {"content-type": string("text/" + "x" * 2000)},
        "content-type-number": {"content-type": string("1", "Number")},
    }
    bodies = {"content-type-not-json": "{not json", "content-type-batch": "[]", "unicode": UNICODE_BODY}
    entries = {label: {"MessageBody": f"poison {label} {bodies.get(label, 'body')}", "MessageAttributes": a}
               for label, a in attrs.items()}
    for label in ("content-type-cloudevents", "content-type-cloudevents-mixed-case"):
        entries[label]["MessageBody"] = spoofed_event % label  # valid JSON, as a forger would send
    entries["control-body"] = {"MessageBody": "poison control-body \t\r\n\u00a0\ufffd"}
    entries["astral-body"] = {"MessageBody": "poison astral-body " + "🙂" * 1000}
    entries["json-spoof-body"] = {"MessageBody": 'poison json-spoof-body {"MessageId":"spoofed","ReceiptHandle":"x"}'}
    entries["max-ascii"] = at_the_limit("max-ascii", {}, lambda n: "a" * n)
    entries["max-unicode"] = at_the_limit("max-unicode", {}, make_body)
    entries["max-with-attributes"] = at_the_limit(
        "max-with-attributes",
        {"trace": string("t" * 1000), "blob": binary(bytes(range(256)) * 16), "content-type": string("text/plain")},
        lambda n: "m" * n)
    return entries


def check_intact(deliveries: Deliveries, bodies: dict[str, str], ids: list[str]) -> list[str]:
    """Problems with what the channel received: a body changed, or an event a CloudEvents reader
    takes for another id. Empty when every delivered copy is intact."""
    problems: list[str] = []
    if isinstance(deliveries, SinkDeliveries):
        for received in deliveries.server.received:
            mid = received.event["id"]
            if mid in bodies and received.body != bodies[mid].encode():
                problems.append(f"{mid}: the sink got a different body")
    else:
        assert isinstance(deliveries, TopicDeliveries)
        for record in deliveries.records(ids, timeout=5):
            mid = ce_id(record)
            if mid in bodies and record.value() != bodies[mid].encode():
                problems.append(f"{mid}: the record's value differs from the body")
            # Every header, as a consumer gets them: the SDK decodes each as UTF-8.
            headers = dict(record.headers() or [])
            try:
                event = ce_kafka.from_kafka(
                    ce_kafka.KafkaMessage(headers=headers, key=record.key(), value=record.value()), JSONFormat())
                read_id = event.get_id()
            except Exception as exc:  # a record a CloudEvents reader cannot read is a problem too
                read_id = f"unreadable ({type(exc).__name__}: {exc})"
            if read_id != mid:
                problems.append(f"{mid}: a CloudEvents reader sees id {read_id!r}")
    return problems


def test_poison_messages(
    sqs: Any, make_queue: Any, deliveries: Deliveries, start_poller: Callable[..., PollerProcess],
    fault_case: Callable[..., FaultCase],
) -> None:
    """Poison messages with --data body, a DLQ after 2 receives (visibility 2 s): each one reaches
    the channel intact under its own MessageId, or the DLQ with its rejection logged and counted.
    Duplicates: 0 (a message is either delivered and deleted, or rejected and never delivered)."""
    case = fault_case("poison messages", deliveries.channel, max_duplicates=0)
    queue = make_queue(visibility_timeout=2, dlq_max_receive_count=2)
    entries = poison_entries()
    labels = list(entries)
    ids = send_messages(sqs, queue.url, list(entries.values()))
    label_of = dict(zip(ids, labels, strict=True))
    bodies = {mid: entries[label]["MessageBody"] for mid, label in label_of.items()}
    dead: list[str] = []
    case.count_with(lambda wait: tally(sqs, ids, deliveries, wait=wait, dead=dead, dlq_url=queue.dlq_url))
    poller = start_poller(queue.url, deliveries.poller_args(), "--data", "body")

    def settled() -> bool:
        dead.extend(m["MessageId"] for m in drain(sqs, queue.dlq_url, idle_receives=1, wait_seconds=1))
        return queue_counts(sqs, queue.url) == (0, 0)

    wait_until(settled, 120, "every poison message delivered or in the DLQ", interval=1)
    assert poller.stop() == 0, poller.log_text()[-3000:]
    result = case.finish()
    in_dlq = sorted(label_of[mid] for mid in result.dead)
    case.note(f"DLQ: {', '.join(in_dlq) or 'none'}")
    forged = {"content-type-cloudevents", "content-type-cloudevents-mixed-case"}
    assert forged <= set(in_dlq), f"a body with an event-format content type was delivered: {forged - set(in_dlq)}"
    problems = check_intact(deliveries, bodies, ids)
    assert not problems, "; ".join(problems)
    text = poller.log_text()
    if result.dead:
        assert "rejected message" in text, "messages went to the DLQ without a rejection in the log"
        rejected = [int(n.replace(",", "")) for n in re.findall(r"rejected ([\d,]+)", text)]
        assert rejected and max(rejected) >= len(result.dead), f"rejections counted: {rejected[-1:]}"
