"""channels/envelopes.py, channels/tracing.py and the rest of what ``channels.events`` maps:
events shaped like their source (``--envelope``), static type and source, trace context,
attribute names and content types. Judged by the cloudevents SDK 2.2, no services needed.

The bodies are AWS's own examples, verbatim (whitespace aside), from:
- SNS: "Amazon SNS raw message delivery" (raw delivery disabled) and "Fanout Amazon SNS
  notifications to Amazon SQS queues";
- EventBridge: "Amazon EventBridge events" (EC2 instance state-change) and "Event structure"
  (CloudFormation: its ``time`` is April 31st, which is no date);
- S3: "Event message structure" (the PUT example and the ``s3:TestEvent`` test message).
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
import pytest
from cloudevents.core.base import BaseCloudEvent
from cloudevents.core.bindings.http import HTTPMessage, from_binary, from_structured
from cloudevents.core.formats.json import JSONFormat

from channels.base import Message, Outcome
from channels.envelopes import Part
from channels.events import EVENT_TYPE, EventFormat, EventShape
from channels.tracing import traceparent_from_xray, valid_traceparent, valid_tracestate

QUEUE = "http://localhost:4566/000000000000/orders"

SNS_RAW_DELIVERY_OFF = """{
  "Type": "Notification",
  "MessageId": "dc1e94d9-56c5-5e96-808d-cc7f68faa162",
  "TopicArn": "arn:aws:sns:us-east-2:111122223333:ExampleTopic1",
  "Subject": "TestSubject",
  "Message": "This is a test message.",
  "Timestamp": "2021-02-16T21:41:19.978Z",
  "SignatureVersion": "1",
  "Signature": "FMG5tlZhJNHLHUXvZgtZzlk24FzVa7oX0T4P03neeXw8ZEXZx6z35j2FOTuNYShn2h0bKNC/zLTnMyIxEzmi2X1shOBWsJHkrW2xkR58ABZF+4uWHEE73yDVR4SyYAikP9jstZzDRm+bcVs8+T0yaLiEGLrIIIL4esi1llhIkgErCuy5btPcWXBdio2fpCRD5x9oR6gmE/rd5O7lX1c1uvnv4r1Lkk4pqP2/iUfxFZva1xLSRvgyfm6D9hNklVyPfy+7TalMD0lzmJuOrExtnSIbZew3foxgx8GT+lbZkLd0ZdtdRJlIyPRP44eyq78sU0Eo/LsDr0Iak4ZDpg8dXg==",
  "SigningCertURL": "https://sns.us-east-2.amazonaws.com/SimpleNotificationService-010a507c1833636cd94bdb98bd93083a.pem",
  "UnsubscribeURL": "https://sns.us-east-2.amazonaws.com/?Action=Unsubscribe&SubscriptionArn=arn:aws:sns:us-east-2:111122223333:ExampleTopic1:e1039402-24e7-40a3-a0d4-797da162b297"
}"""  # noqa: E501

SNS_FANOUT = """{
   "Type" : "Notification",
   "MessageId" : "63a3f6b6-d533-4a47-aef9-fcf5cf758c76",
   "TopicArn" : "arn:aws:sns:us-west-2:123456789012:MyTopic",
   "Subject" : "Testing publish to subscribed queues",
   "Message" : "Hello world!",
   "Timestamp" : "2012-03-29T05:12:16.901Z",
   "SignatureVersion" : "1",
   "Signature" : "EXAMPLEnTrFPa3...",
   "SigningCertURL" : "https://sns.us-west-2.amazonaws.com/SimpleNotificationService-f3ecfb7224c7233fe7bb5f59f96de52f.pem",
   "UnsubscribeURL" : "https://sns.us-west-2.amazonaws.com/?Action=Unsubscribe&SubscriptionArn=arn:aws:sns:us-west-2:123456789012:MyTopic:c7fe3a54-ab0e-4ec2-88e0-db410a0f2bee"
}"""

EVENTBRIDGE_EC2 = """{
  "version": "0",
  "id": "6a7e8feb-b491-4cf7-a9f1-bf3703467718",
  "detail-type": "EC2 Instance State-change Notification",
  "source": "aws.ec2",
  "account": "111122223333",
  "time": "2017-12-22T18:43:48Z",
  "region": "us-west-1",
  "resources": [
    "arn:aws:ec2:us-west-1:123456789012:instance/i-1234567890abcdef0"
  ],
  "detail": {
    "instance-id": "i-1234567890abcdef0",
    "state": "terminated"
  }
}"""

EVENTBRIDGE_CLOUDFORMATION = """{
  "version": "0",
  "source": "aws.cloudformation",
  "account": "123456789012",
  "id": "12345678-1234-1234-1234-111122223333",
  "region": "us-east-1",
  "detail-type": "CloudFormation Stack Status Change",
  "time": "2022-04-31T17:00:00Z",
  "resources": ["arn:aws:cloudformation:us-east-1:123456789012:stack/teststack"],
  "detail": {
    "stack-id": "arn:aws:cloudformation:us-west-1:123456789012:stack/teststack",
    "status-details": {
      "status": "CREATE_COMPLETE",
      "status-reason": ""
    }
  }
}"""

S3_PUT = """{
   "Records":[
      {
         "eventVersion":"2.1",
         "eventSource":"aws:s3",
         "awsRegion":"us-west-2",
         "eventTime":"1970-01-01T00:00:00.000Z",
         "eventName":"ObjectCreated:Put",
         "userIdentity":{
            "principalId":"AIDAJDPLRKLG7UEXAMPLE"
         },
         "requestParameters":{
            "sourceIPAddress":"127.0.0.1"
         },
         "responseElements":{
            "x-amz-request-id":"C3D13FE58DE4C810",
            "x-amz-id-2":"FMyUVURIY8/IgAtTv8xRjskZQpcIZ9KG4V5Wp6S7S/JRWeUWerMUE5JgHvANOjpD"
         },
         "s3":{
            "s3SchemaVersion":"1.0",
            "configurationId":"testConfigRule",
            "bucket":{
               "name":"mybucket",
               "ownerIdentity":{
                  "principalId":"A3NL1KOZZKExample"
               },
               "arn":"arn:aws:s3:::mybucket"
            },
            "object":{
               "key":"HappyFace.jpg",
               "size":1024,
               "eTag":"d41d8cd98f00b204e9800998ecf8427e",
               "versionId":"096fKKXTRTtl3on89fVO.nfljtsv6qko",
               "sequencer":"0055AED6DCD90281E5"
            }
         }
      }
   ]
}"""

S3_TEST_EVENT = """{
   "Service":"Amazon S3",
   "Event":"s3:TestEvent",
   "Time":"2014-10-13T15:57:02.089Z",
   "Bucket":"bucketname",
   "RequestId":"5582815E1AEA5ADF",
   "HostId":"8cLeGAmw098X5cv4Zkwcmo8vvZa3eH3eKxsPzbB9wrR+YstdA6Knx4Ip8EXAMPLE"
}"""

X_RAY = "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1"
TRACEPARENT = "00-5759e988bd862e3fe1be46a994272793-53995c3f42cd8ad8-01"


def message(body: str, message_attributes: dict[str, Any] | None = None, **attributes: str) -> Message:
    return Message(id="sqs-message-1", body=body, ack_id="handle",
                   attributes={"SentTimestamp": "1700000000123", **attributes},
                   message_attributes=message_attributes or {})


def string(value: str, data_type: str = "String") -> dict[str, str]:
    return {"DataType": data_type, "StringValue": value}


def fmt(envelope: str = "auto", data_mode: str = "message", **shape: str) -> EventFormat:
    return EventFormat(QUEUE, data_mode, shape=EventShape(envelope=envelope, **shape))


def events(f: EventFormat, m: Message) -> list[Message]:
    """What the channel publishes for ``m``: its events (or ``m`` itself)."""
    reports: list[tuple[Message, Outcome]] = []
    batch, _ = f.unwrap([m], lambda msg, outcome, *rest: reports.append((msg, outcome)))
    return list(batch)


def binary(f: EventFormat, m: Message) -> BaseCloudEvent:
    head, body = f.http_binary_head(m)
    headers = dict(line.split(": ", 1) for line in head.decode("ascii").split("\r\n") if line)
    headers.update(f.http_binary_constant())
    return from_binary(HTTPMessage(headers=headers, body=body), JSONFormat())


def structured(f: EventFormat, m: Message) -> BaseCloudEvent:
    return from_structured(HTTPMessage(headers={"content-type": "application/cloudevents+json"},
                                       body=f.structured(m)), JSONFormat())


BOTH = pytest.mark.parametrize("parse", [binary, structured], ids=["binary", "structured"])


# -- SNS ------------------------------------------------------------------------------------


@BOTH
def test_an_sns_notification_becomes_the_event_it_carries(parse: Any) -> None:
    f = fmt()
    [part] = events(f, message(SNS_RAW_DELIVERY_OFF))
    event = parse(f, part)
    assert event.get_id() == "dc1e94d9-56c5-5e96-808d-cc7f68faa162"
    assert event.get_source() == "arn:aws:sns:us-east-2:111122223333:ExampleTopic1"
    assert event.get_type() == "com.amazonaws.sns.notification"
    assert event.get_subject() == "TestSubject"
    assert event.get_time().isoformat() == "2021-02-16T21:41:19.978000+00:00"
    assert event.get_datacontenttype() == "text/plain"
    assert event.get_data() in ("This is a test message.", b"This is a test message.")


def test_the_fanout_example_and_a_json_message() -> None:
    f = fmt("sns")
    [part] = events(f, message(SNS_FANOUT))
    assert structured(f, part).get_data() == "Hello world!"
    doc = orjson.loads(SNS_FANOUT)
    doc["Message"] = '{"order": 7, "items": ["tea"]}'
    del doc["Subject"]  # SNS leaves it out when the publisher gave none
    [part] = events(f, message(orjson.dumps(doc).decode()))
    for parse in (binary, structured):
        event = parse(f, part)
        assert event.get_datacontenttype() == "application/json"
        assert event.get_subject() is None
    assert structured(f, part).get_data() == {"order": 7, "items": ["tea"]}
    assert f.data(part) == (b'{"order": 7, "items": ["tea"]}', "application/json")  # the Message as sent


def test_sns_message_attributes_become_extensions_named_as_sqs_attributes_are(caplog: Any) -> None:
    doc = orjson.loads(SNS_FANOUT)
    doc["MessageAttributes"] = {  # the notification's shape for them (Type, Value)
        "tenant": {"Type": "String", "Value": "contoso"},
        "CorrelationId": {"Type": "String", "Value": "c-1"},
        "count": {"Type": "Number", "Value": "5"},
        "blob": {"Type": "Binary", "Value": "AQID"},
        "tags": {"Type": "String.Array", "Value": '["blue","green"]'},
        "x-request-id": {"Type": "String", "Value": "r-1"},
    }
    f = fmt()
    [part] = events(f, message(orjson.dumps(doc).decode()))
    with caplog.at_level(logging.INFO, "channels.events"):
        attrs = f.attributes(part)
    assert attrs["tenant"] == "contoso" and attrs["correlationid"] == "c-1" and attrs["count"] == "5"
    assert attrs["tags"] == '["blue","green"]'
    assert "blob" not in attrs and not any("request" in name for name in attrs)
    assert "'x-request-id'" in caplog.text


# -- EventBridge -------------------------------------------------------------------------------


@BOTH
def test_an_eventbridge_event_maps_as_eventbridge_maps_it_to_cloudevents(parse: Any) -> None:
    f = fmt()
    [part] = events(f, message(EVENTBRIDGE_EC2))
    event = parse(f, part)
    assert event.get_id() == "6a7e8feb-b491-4cf7-a9f1-bf3703467718"
    assert event.get_source() == "aws.ec2"
    assert event.get_type() == "EC2 Instance State-change Notification"
    assert event.get_subject() == "arn:aws:ec2:us-west-1:123456789012:instance/i-1234567890abcdef0"
    assert event.get_time().isoformat() == "2017-12-22T18:43:48+00:00"
    assert event.get_datacontenttype() == "application/json"
    data = event.get_data()
    assert (orjson.loads(data) if isinstance(data, bytes) else data) == {
        "instance-id": "i-1234567890abcdef0", "state": "terminated"}


def test_a_time_that_is_no_date_is_left_out() -> None:
    f = fmt("eventbridge")
    [part] = events(f, message(EVENTBRIDGE_CLOUDFORMATION))
    attrs = f.attributes(part)
    assert "time" not in attrs  # 2022-04-31
    assert structured(f, part).get_type() == "CloudFormation Stack Status Change"


# -- S3 ---------------------------------------------------------------------------------------


@BOTH
def test_an_s3_record_becomes_an_event(parse: Any) -> None:
    f = fmt()
    [part] = events(f, message(S3_PUT))
    event = parse(f, part)
    assert event.get_id() == "0055AED6DCD90281E5:ObjectCreated:Put:HappyFace.jpg"
    assert event.get_source() == "arn:aws:s3:::mybucket"
    assert event.get_type() == "com.amazonaws.s3.ObjectCreated:Put"
    assert event.get_subject() == "HappyFace.jpg"
    assert event.get_time().isoformat() == "1970-01-01T00:00:00+00:00"
    data = event.get_data()
    assert (orjson.loads(data) if isinstance(data, bytes) else data) == orjson.loads(S3_PUT)["Records"][0]


def two_records() -> str:
    doc = orjson.loads(S3_PUT)
    second = orjson.loads(orjson.dumps(doc["Records"][0]))
    second["s3"]["object"]["key"] = "SadFace.jpg"
    del second["s3"]["object"]["sequencer"]
    doc["Records"].append(second)
    return orjson.dumps(doc).decode()


def test_each_record_is_an_event_with_an_id_stable_across_redeliveries() -> None:
    f = fmt("s3")
    first = [p.id for p in events(f, message(two_records()))]
    again = [p.id for p in events(f, message(two_records()))]
    assert first == again == ["0055AED6DCD90281E5:ObjectCreated:Put:HappyFace.jpg", "sqs-message-1:1"]


def gathered(outcomes: list[Outcome]) -> list[tuple[str, Outcome, str]]:
    reports: list[tuple[str, Outcome, str]] = []
    f = fmt("s3")
    doc = orjson.loads(S3_PUT)
    doc["Records"] = doc["Records"] * len(outcomes)
    parts, report = f.unwrap([message(orjson.dumps(doc).decode())],
                             lambda m, outcome, reason="", *_: reports.append((m.id, outcome, reason)))
    assert len(parts) == len(outcomes) and all(type(p) is Part for p in parts)
    for part, outcome in zip(parts, outcomes, strict=True):
        assert not reports  # nothing until every event reported
        report(part, outcome, "" if outcome is Outcome.ACK else f"said {outcome.value}")
    return reports


def test_a_message_of_n_events_is_reported_once_all_are_in() -> None:
    assert gathered([Outcome.ACK, Outcome.ACK]) == [("sqs-message-1", Outcome.ACK, "")]
    [(_, outcome, reason)] = gathered([Outcome.ACK, Outcome.RETRY, Outcome.ACK])
    assert outcome is Outcome.RETRY and "said retry" in reason
    [(_, outcome, reason)] = gathered([Outcome.RETRY, Outcome.REJECT])
    assert outcome is Outcome.REJECT and "said reject" in reason


def test_an_s3_test_event_is_acked_and_sends_nothing(caplog: Any) -> None:
    reports: list[tuple[str, Outcome]] = []
    with caplog.at_level(logging.INFO, "channels.envelopes"):
        batch, _ = fmt().unwrap([message(S3_TEST_EVENT)], lambda m, o, *_: reports.append((m.id, o)))
    assert list(batch) == [] and reports == [("sqs-message-1", Outcome.ACK)]
    assert "s3:TestEvent" in caplog.text


# -- what passes unchanged, and what a body cannot do -------------------------------------------


@pytest.mark.parametrize("body", [
    "plain text", '{"order": 1}', "[1, 2]", '{"Type": "Notification"}',  # no MessageId, TopicArn
    '{"Records": [{"eventSource": "aws:sqs"}]}', '{"detail-type": "x", "source": "y"}',
])
def test_other_bodies_pass_unchanged(body: str) -> None:
    f = fmt()
    [same] = events(f, message(body))
    assert type(same) is Message
    attrs = f.attributes(same)
    assert attrs["type"] == EVENT_TYPE and attrs["source"] == QUEUE and attrs["id"] == "sqs-message-1"


def test_an_explicit_envelope_maps_only_its_own_shape() -> None:
    f = fmt("sns")
    assert [type(m) for m in events(f, message(EVENTBRIDGE_EC2))] == [Message]
    assert [type(m) for m in events(fmt("none"), message(SNS_FANOUT))] == [Message]


def test_a_body_sets_nothing_beyond_the_mapping() -> None:
    doc = orjson.loads(EVENTBRIDGE_EC2)
    doc.update({"specversion": "0.3", "datacontenttype": "application/cloudevents+json", "traceparent": TRACEPARENT,
                "partitionkey": "p", "data": "forged"})
    f = fmt()
    [part] = events(f, message(orjson.dumps(doc).decode()))
    attrs = f.attributes(part)
    assert set(attrs) == {"specversion", "id", "source", "type", "subject", "time"}
    assert attrs["specversion"] == "1.0"
    assert f.data(part)[1] == "application/json"
    event = structured(f, part)
    assert event.get_datacontenttype() == "application/json" and event.get_data()["state"] == "terminated"


def test_with_an_envelope_source_and_type_are_per_message_headers() -> None:
    f = fmt(type="dev.knative.connector.event.aws-sqs")
    assert set(f.http_binary_constant()) == {"ce-specversion"}
    plain = binary(f, message("hello"))
    assert plain.get_type() == "dev.knative.connector.event.aws-sqs" and plain.get_source() == QUEUE
    [part] = events(f, message(SNS_FANOUT))
    assert binary(f, part).get_type() == "com.amazonaws.sns.notification"  # the envelope's mapping wins


# -- static type and source -------------------------------------------------------------------


@BOTH
def test_static_type_and_source(parse: Any) -> None:
    f = fmt("none", type="dev.knative.connector.event.aws-sqs", source="dev.knative.eventing.aws-sqs-source")
    assert f.http_binary_constant()["ce-type"] == "dev.knative.connector.event.aws-sqs"
    event = parse(f, message("hello"))
    assert event.get_type() == "dev.knative.connector.event.aws-sqs"
    assert event.get_source() == "dev.knative.eventing.aws-sqs-source"


@pytest.mark.parametrize("shape", [{"envelope": "sqs"}, {"type": "a\r\nb"}, {"source": "x" * 1025}])
def test_bad_shapes_are_one_line_errors(shape: dict[str, str]) -> None:
    with pytest.raises(ValueError) as caught:
        EventShape(**shape)
    assert "\n" not in str(caught.value)


# -- tracing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("header", "expected"), [
    (X_RAY, TRACEPARENT),
    ("Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=0",
     "00-5759e988bd862e3fe1be46a994272793-53995c3f42cd8ad8-00"),
    ("Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=?",
     "00-5759e988bd862e3fe1be46a994272793-53995c3f42cd8ad8-00"),
    ("Root=1-5759E988-BD862E3FE1BE46A994272793; Parent=53995C3F42CD8AD8; Sampled=1; Lineage=a87bd80c:1|68fd508a:5",
     TRACEPARENT),
    ("Parent=53995c3f42cd8ad8;Root=1-5759e988-bd862e3fe1be46a994272793;Sampled=1", TRACEPARENT),
    ("Root=1-5759e988-bd862e3fe1be46a994272793;Sampled=1", None),  # no parent span
    ("Root=1-5759e988-bd862e3fe1be46a99427279;Parent=53995c3f42cd8ad8", None),  # 23 hex
    ("Root=2-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8", None),
    ("Root=1-00000000-000000000000000000000000;Parent=53995c3f42cd8ad8", None),
    ("Root=1-5759e988-bd862e3fe1be46a994272793;Parent=0000000000000000", None),
    ("Root=1-5759e988-bd862e3fe1be46a99427279g;Parent=53995c3f42cd8ad8", None),
    ("", None), ("garbage", None),
])
def test_x_ray_headers_to_traceparent(header: str, expected: str | None) -> None:
    assert traceparent_from_xray(header) == expected


@pytest.mark.parametrize(("value", "valid"), [
    (TRACEPARENT, True), ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00", True),
    ("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-holds", True),
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra", False),
    ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", False),
    ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", False),
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", False),
    ("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", False), ("", False),
])
def test_traceparent_validity(value: str, valid: bool) -> None:
    assert valid_traceparent(value) is valid


def test_tracestate_validity() -> None:
    assert valid_tracestate("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE")
    assert valid_tracestate("tenant@vendor=x, other=y")
    assert not valid_tracestate("no-equals-sign") and not valid_tracestate("a=b\r\nc=d")
    assert not valid_tracestate(",".join(f"k{i}=v" for i in range(33))) and not valid_tracestate("")


@BOTH
def test_aws_trace_header_becomes_traceparent(parse: Any) -> None:
    event = parse(fmt("none"), message("hello", AWSTraceHeader=X_RAY))
    assert event.get_extension("traceparent") == TRACEPARENT


def test_a_valid_traceparent_attribute_wins_with_its_tracestate() -> None:
    own = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    attrs = fmt("none").attributes(message("x", {"traceparent": string(own), "tracestate": string("rojo=1")},
                                           AWSTraceHeader=X_RAY))
    assert attrs["traceparent"] == own and attrs["tracestate"] == "rojo=1"
    attrs = fmt("none").attributes(message("x", {"traceparent": string(own), "tracestate": string("bad")}))
    assert attrs["traceparent"] == own and "tracestate" not in attrs


def test_an_invalid_traceparent_attribute_gives_way_to_aws_trace_header() -> None:
    bad = {"traceparent": string("00-xyz"), "tracestate": string("rojo=1")}
    attrs = fmt("none").attributes(message("x", bad, AWSTraceHeader=X_RAY))
    assert attrs["traceparent"] == TRACEPARENT and "tracestate" not in attrs
    attrs = fmt("none").attributes(message("x", bad))
    assert "traceparent" not in attrs and "tracestate" not in attrs


def test_an_enveloped_event_carries_the_messages_trace() -> None:
    f = fmt()
    [part] = events(f, message(SNS_FANOUT, AWSTraceHeader=X_RAY))
    assert binary(f, part).get_extension("traceparent") == TRACEPARENT


def test_kafka_binary_records_carry_ce_traceparent_and_the_mapping() -> None:
    from channels.kafka.config import KafkaConfig
    from channels.kafka.records import RecordBuilder

    config = KafkaConfig(bootstrap_servers="127.0.0.1:9", topic="t", shape=EventShape(envelope="auto"))
    builder = RecordBuilder(config, QUEUE)
    [part] = events(builder.events, message(EVENTBRIDGE_EC2, AWSTraceHeader=X_RAY))
    headers = dict(builder.build(part).headers)
    assert headers["ce_traceparent"] == TRACEPARENT.encode()
    assert headers["ce_id"] == b"6a7e8feb-b491-4cf7-a9f1-bf3703467718" and headers["ce_source"] == b"aws.ec2"
    assert headers["ce_type"] == b"EC2 Instance State-change Notification"
    assert headers["content-type"] == b"application/json"
    with pytest.raises(ValueError, match="--envelope"):
        KafkaConfig(bootstrap_servers="127.0.0.1:9", topic="t", format="raw", shape=EventShape(envelope="sns"))


# -- attribute names and content types --------------------------------------------------------


def test_attribute_names_are_lowered_when_that_makes_them_valid(caplog: Any) -> None:
    f = fmt("none")
    attributes = {"TraceId": string("upper"), "Tenant": string("lowered"), "tenant": string("exact"),
                  "ID": string("spec"), "trace-id": string("dash"), "Content-Type": string("text/csv")}
    with caplog.at_level(logging.INFO, "channels.events"):
        attrs = f.attributes(message("x", attributes))
        f.attributes(message("x", attributes))
    assert attrs["traceid"] == "upper" and attrs["tenant"] == "exact" and attrs["id"] == "sqs-message-1"
    assert caplog.text.count("'trace-id'") == 1 and caplog.text.count("'ID'") == 1  # once per name
    assert "Content-Type" not in caplog.text


@pytest.mark.parametrize(("body", "content_type"), [
    ('{"a": 1}', "application/json"), ("  [1, 2]", "application/json"), ("\n{\"a\": {}}\n", "application/json"),
    ("{not json", "text/plain"), ("42", "text/plain"), ('"text"', "text/plain"), ("hello", "text/plain"),
    ("", "text/plain"),
])
def test_data_body_says_application_json_only_for_a_json_body(body: str, content_type: str) -> None:
    f = fmt("none", data_mode="body")
    assert f.data(message(body))[1] == content_type
    event = structured(f, message(body))
    assert event.get_datacontenttype() == content_type
    if content_type == "application/json":
        assert event.get_data() == orjson.loads(body)


def test_a_content_type_attribute_still_wins() -> None:
    f = fmt("none", data_mode="body")
    assert f.data(message('{"a": 1}', {"content-type": string("text/csv")}))[1] == "text/csv"
