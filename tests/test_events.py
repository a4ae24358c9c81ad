"""channels/events.py: the SQS message -> CloudEvent mapping, judged by the cloudevents SDK 2.2.

The SDK's HTTP binding (``cloudevents.core.bindings.http``) parses what ``http_binary()`` and
``structured()`` produce, as a receiver would; no services needed.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from cloudevents.core.base import BaseCloudEvent
from cloudevents.core.bindings.http import HTTPMessage, from_binary, from_http, from_structured
from cloudevents.core.formats.json import JSONFormat

from channels.base import Message
from channels.events import EVENT_TYPE, EventError, EventFormat, is_extension_name, parse_overrides

SOURCE = "http://localhost:4566/000000000000/orders"
SENT_MS = "1700000000123"
SENT = datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=UTC)


def make_message(body: str = '{"item": "coffee"}', message_attributes: dict[str, Any] | None = None,
                 **attributes: str) -> Message:
    return Message(
        id="9f1c7f0e-1b2a-4c5d-8e9f-0a1b2c3d4e5f",
        body=body,
        ack_id="receipt-handle-secret",
        attributes={"SentTimestamp": SENT_MS, "ApproximateReceiveCount": "1", **attributes},
        message_attributes=message_attributes or {},
        md5_of_body="0123456789abcdef0123456789abcdef",
    )


def string(value: str, data_type: str = "String") -> dict[str, str]:
    return {"DataType": data_type, "StringValue": value}


def binary_event(fmt: EventFormat, message: Message) -> BaseCloudEvent:
    headers, body = fmt.http_binary(message)
    for name, value in headers.items():  # what http.client can put on the wire
        value.encode("latin-1")
        assert "\r" not in value and "\n" not in value, (name, value)
    return from_binary(HTTPMessage(headers=headers, body=body), JSONFormat())


def structured_event(fmt: EventFormat, message: Message) -> BaseCloudEvent:
    body = fmt.structured(message)
    return from_structured(HTTPMessage(headers={"content-type": "application/cloudevents+json"}, body=body),
                           JSONFormat())


BOTH = pytest.mark.parametrize("parse", [binary_event, structured_event], ids=["binary", "structured"])


# -- context attributes and data ---------------------------------------------------------------


@BOTH
def test_message_mode(parse: Any) -> None:
    message = make_message(MessageGroupId="g1")
    event = parse(EventFormat(SOURCE), message)
    assert event.get_specversion() == "1.0"
    assert event.get_id() == message.id
    assert event.get_source() == SOURCE
    assert event.get_type() == EVENT_TYPE == "aws.sqs.message"
    assert event.get_time() == SENT
    assert event.get_datacontenttype() == "application/json"
    assert event.get_data() == {
        "MessageId": message.id,
        "Body": '{"item": "coffee"}',
        "Attributes": {"SentTimestamp": SENT_MS, "ApproximateReceiveCount": "1", "MessageGroupId": "g1"},
        "MessageAttributes": {},
        "MD5OfBody": message.md5_of_body,
    }
    assert "receipt-handle-secret" not in str(event.get_attributes()) + str(event.get_data())


def test_binary_headers_shape() -> None:
    headers, body = EventFormat(SOURCE).http_binary(make_message())
    assert headers["Content-Type"] == "application/json"
    assert headers["ce-specversion"] == "1.0"
    assert headers["ce-time"] == "2023-11-14T22:13:20.123Z"
    assert headers["ce-source"] == SOURCE
    assert orjson.loads(body)["Body"] == '{"item": "coffee"}'
    assert b"receipt-handle-secret" not in body


def test_structured_body_is_one_json_event() -> None:
    doc = orjson.loads(EventFormat(SOURCE).structured(make_message()))
    assert doc["specversion"] == "1.0" and doc["time"] == "2023-11-14T22:13:20.123Z"
    assert doc["data"]["MessageId"] == doc["id"]
    assert "data_base64" not in doc
    # and the SDK picks structured mode from it
    event = from_http(HTTPMessage(headers={"content-type": "application/cloudevents+json"},
                                  body=orjson.dumps(doc)), JSONFormat())
    assert event.get_type() == EVENT_TYPE


@BOTH
def test_unicode_and_large_body_survive(parse: Any) -> None:
    body = "caf\u00e9 \u2615 \U0001f600 \"quoted\" 100% \\ \n" * 2000
    event = parse(EventFormat(SOURCE), make_message(body=body))
    assert event.get_data()["Body"] == body


def test_time_edge_cases() -> None:
    fmt = EventFormat(SOURCE)
    assert "time" not in fmt.attributes(Message(id="1", body="", ack_id="h"))
    assert fmt.attributes(make_message(SentTimestamp="0"))["time"] == "1970-01-01T00:00:00.000Z"
    assert fmt.attributes(make_message(SentTimestamp="1700000000001"))["time"].endswith(":20.001Z")
    for bad in ("yesterday", "1.5e3", "99999999999999999999999"):
        with pytest.raises(EventError):
            fmt.attributes(make_message(SentTimestamp=bad))
        with pytest.raises(EventError):
            fmt.http_binary(make_message(SentTimestamp=bad))


# -- extensions ---------------------------------------------------------------------------------


MAPPED = {
    "tenant": string("acme"),
    "count": {"DataType": "Number", "StringValue": "42"},
    "price": {"DataType": "Number.float", "StringValue": "1.5"},
    "region2": string("eu", "String.custom"),
    "a" * 20: string("twenty"),
}
NOT_MAPPED = {
    "blob": {"DataType": "Binary", "BinaryValue": "AAEC"},
    "blobx": {"DataType": "Binary.png", "BinaryValue": "AAEC"},
    "Tenant": string("upper case"),
    "trace-id": string("dash"),
    "trace_id": string("underscore"),
    "a" * 21: string("too long"),
    "caf\u00e9": string("not ascii"),
    # spec attributes: a message must not be able to change the event's own context
    "id": string("forged id"),
    "source": string("forged source"),
    "type": string("forged type"),
    "time": string("forged time"),
    "specversion": string("0.3"),
    "datacontenttype": string("text/html"),
    "dataschema": string("http://x"),
    "subject": string("forged subject"),
    "data": string("forged data"),
}


@BOTH
def test_extension_mapping(parse: Any) -> None:
    message = make_message(message_attributes={**MAPPED, **NOT_MAPPED})
    event = parse(EventFormat(SOURCE), message)
    attributes = event.get_attributes()
    for name, value in MAPPED.items():
        assert event.get_extension(name) == value["StringValue"], name
    for name in NOT_MAPPED:
        if name not in ("id", "source", "type", "time", "specversion", "datacontenttype"):
            assert name not in attributes, name
    assert event.get_id() == message.id
    assert event.get_source() == SOURCE
    assert event.get_type() == EVENT_TYPE
    assert event.get_time() == SENT
    assert event.get_specversion() == "1.0"
    assert event.get_datacontenttype() == "application/json"
    assert event.get_dataschema() is None and event.get_subject() is None
    extensions = set(attributes) - {"id", "source", "type", "time", "specversion", "datacontenttype"}
    assert extensions == set(MAPPED)
    # every attribute is still in data, unmapped or not
    assert event.get_data()["MessageAttributes"] == {**MAPPED, **NOT_MAPPED}


@pytest.mark.parametrize("name", ["a", "abc123", "x" * 20, "0"])
def test_is_extension_name_valid(name: str) -> None:
    assert is_extension_name(name)


@pytest.mark.parametrize("name", ["", "A", "a-b", "a_b", "a b", "x" * 21, "\u00e9", "id", "source",
                                  "type", "specversion", "time", "data", "data_base64", "dataschema",
                                  "subject", "datacontenttype", "abc\n"])
def test_is_extension_name_invalid(name: str) -> None:
    assert not is_extension_name(name)


TRICKY_VALUES = [
    "caf\u00e9 \u2615",
    "with space",
    'say "hi"',
    "100% sure",
    "%41 is not A",
    "\U0001f600",
    "line\r\nX-Injected: 1",
    "tab\there",
    "",
    " leading and trailing ",
    "plain-ascii_!#$&'()*+,/:;<=>?@[]^`{|}~",
]


@pytest.mark.parametrize("value", TRICKY_VALUES)
def test_header_values_percent_encoded_round_trip(value: str) -> None:
    message = make_message(message_attributes={"note": string(value)})
    fmt = EventFormat(SOURCE, overrides={"over": value})
    headers, _ = fmt.http_binary(message)
    for name in ("ce-note", "ce-over"):
        assert all(0x21 <= ord(c) <= 0x7E for c in headers[name]), headers[name]
        assert '"' not in headers[name] and " " not in headers[name]
    event = binary_event(fmt, message)
    assert event.get_extension("note") == value
    assert event.get_extension("over") == value
    assert structured_event(fmt, message).get_extension("note") == value


@pytest.mark.parametrize("value", TRICKY_VALUES)
@pytest.mark.parametrize("data_mode", ["message", "body"])
def test_the_hot_path_header_block_is_what_the_checked_encoder_makes(value: str, data_mode: str) -> None:
    """``http_binary_head`` skips the header check: it must be safe by construction, whatever the
    message holds (its id, attributes, content type)."""
    from channels.transport.http import encode_headers

    message = make_message(message_attributes={"note": string(value), "n": string("7", "Number"),
                                               "content-type": string("application/xml; charset=utf-8")})
    message = Message(id=value or "x", body=message.body, ack_id=message.ack_id,
                      attributes=message.attributes, message_attributes=message.message_attributes)
    fmt = EventFormat(SOURCE, data_mode=data_mode, overrides={"over": value})
    headers, body = fmt.http_binary_message(message)
    head, head_body = fmt.http_binary_head(message)
    assert (head, head_body) == (encode_headers(headers), body)


def test_safe_values_are_sent_as_is() -> None:
    headers, _ = EventFormat(SOURCE).http_binary(make_message(message_attributes={"k": string("a-b_c.d/e:f")}))
    assert headers["ce-k"] == "a-b_c.d/e:f"


@BOTH
def test_overrides_applied_last(parse: Any) -> None:
    message = make_message(message_attributes={"tenant": string("from-message"), "other": string("kept")})
    event = parse(EventFormat(SOURCE, overrides={"tenant": "from-overrides", "extra": "x"}), message)
    assert event.get_extension("tenant") == "from-overrides"
    assert event.get_extension("extra") == "x"
    assert event.get_extension("other") == "kept"


# -- data=body ----------------------------------------------------------------------------------


@BOTH
def test_body_mode_defaults_to_text_plain(parse: Any) -> None:
    event = parse(EventFormat(SOURCE, data_mode="body"), make_message(body="just text, caf\u00e9"))
    assert event.get_datacontenttype() == "text/plain"
    assert event.get_data() == "just text, caf\u00e9"


@BOTH
@pytest.mark.parametrize("name", ["content-type", "Content-Type", "CONTENT-TYPE"])
def test_body_mode_takes_content_type_attribute(parse: Any, name: str) -> None:
    message = make_message(body="<order>coffee</order>",
                           message_attributes={name: string("application/xml; charset=utf-8")})
    event = parse(EventFormat(SOURCE, data_mode="body"), message)
    assert event.get_datacontenttype() == "application/xml; charset=utf-8"
    assert event.get_data() == "<order>coffee</order>"


@BOTH
@pytest.mark.parametrize("content_type", ["application/json", "application/vnd.acme+json; charset=utf-8"])
def test_body_mode_json_body(parse: Any, content_type: str) -> None:
    message = make_message(body='{"item": "coffee", "n": [1, 2]}',
                           message_attributes={"content-type": string(content_type)})
    event = parse(EventFormat(SOURCE, data_mode="body"), message)
    assert event.get_datacontenttype() == content_type
    assert event.get_data() == {"item": "coffee", "n": [1, 2]}


def test_body_mode_binary_sends_body_bytes_unchanged() -> None:
    body = '{"b": 1,   "a": "caf\u00e9"}'
    message = make_message(body=body, message_attributes={"content-type": string("application/json")})
    headers, sent = EventFormat(SOURCE, data_mode="body").http_binary(message)
    assert sent == body.encode()
    assert headers["Content-Type"] == "application/json"


@pytest.mark.parametrize("bad", [
    "",
    "text",
    "not a type",
    "text/plain\r\nX-Injected: 1",
    "text/plain; charset=utf-8\nX: 1",
    "/plain",
    "text/",
    "t\u00ebxt/plain",
    "\u65e5\u672c/plain",
    "text/plain; charset=\u65e5\u672c",
    "text/plain\r\n; charset=utf-8",
    "text/plain; a=\x01",
    "text/plain; a=b\x7f",
])
def test_invalid_content_type_attribute(bad: str) -> None:
    message = make_message(body="x", message_attributes={"content-type": string(bad)})
    fmt = EventFormat(SOURCE, data_mode="body")
    with pytest.raises(EventError):
        fmt.http_binary(message)
    with pytest.raises(EventError):
        fmt.structured(message)
    with pytest.raises(EventError):
        fmt.data(message)
    # data=message does not look at it: the attribute is just data there
    EventFormat(SOURCE).http_binary(message)


@pytest.mark.parametrize("content_type", [
    "application/cloudevents+json",
    "Application/CloudEvents+JSON; charset=utf-8",
    "application/cloudevents-batch+json",
    "application/cloudevents",
    "application/cloudevents+avro",
    "APPLICATION/CLOUDEVENTS+JSON ;x=y",
])
def test_event_format_content_type_is_refused_in_every_mode(content_type: str) -> None:
    """A sender must not choose the event's id, source and type: with this content type a binding-
    following receiver reads the body as a whole event (seen: id 'spoofed-id' at the sink)."""
    body = '{"specversion":"1.0","id":"spoofed-id","source":"https://payments.example/ledger","type":"x"}'
    message = make_message(body=body, message_attributes={"Content-Type": string(content_type)})
    fmt = EventFormat(SOURCE, data_mode="body")
    for build in (fmt.http_binary, fmt.http_binary_head, fmt.structured, fmt.data):
        with pytest.raises(EventError, match="refused"):
            build(message)
    # data=message sends application/json, with the attribute inside the data: nothing to refuse
    headers, _ = EventFormat(SOURCE).http_binary(message)
    assert headers["Content-Type"] == "application/json"
    assert headers["ce-id"] == message.id


@pytest.mark.parametrize("body", ["{not json", "", "{\"a\": 1", "NaN"])
def test_structured_body_mode_invalid_json(body: str) -> None:
    message = make_message(body=body, message_attributes={"content-type": string("application/json")})
    with pytest.raises(EventError):
        EventFormat(SOURCE, data_mode="body").structured(message)


def test_event_error_is_a_value_error() -> None:
    assert issubclass(EventError, ValueError)


def test_unknown_data_mode() -> None:
    with pytest.raises(ValueError):
        EventFormat(SOURCE, data_mode="both")


# -- K_CE_OVERRIDES -----------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    (None, {}),
    ("", {}),
    ("{}", {}),
    ('{"extensions": {}}', {}),
    ('{"extensions": {"tenant": "acme", "env2": "prod"}}', {"tenant": "acme", "env2": "prod"}),
    ('{"extensions": {"note": "caf\u00e9 \\"q\\" 100%"}}', {"note": 'caf\u00e9 "q" 100%'}),
])
def test_parse_overrides(text: str | None, expected: dict[str, str]) -> None:
    assert parse_overrides(text) == expected


@pytest.mark.parametrize("text", [
    "{not json",
    "[1, 2]",
    '"extensions"',
    '{"extensions": ["a"]}',
    '{"extensions": "a=b"}',
    '{"extensions": {"Bad-Name": "x"}}',
    '{"extensions": {"UPPER": "x"}}',
    '{"extensions": {"id": "forged"}}',
    '{"extensions": {"source": "forged"}}',
    '{"extensions": {"' + "x" * 21 + '": "x"}}',
    '{"extensions": {"count": 1}}',
    '{"extensions": {"flag": true}}',
    '{"extensions": {"none": null}}',
])
def test_parse_overrides_invalid(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_overrides(text)
    message = str(info.value)
    assert "K_CE_OVERRIDES" in message
    assert "\n" not in message
