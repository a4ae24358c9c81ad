"""The in-memory channel and the message dumper: real servers on 127.0.0.1, real HTTP.

The ``cloudevents`` SDK (2.2, ``cloudevents.core.bindings.http``) builds the events we send and
parses what the subscribers got, as the independent judge.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests
from cloudevents.core.bindings.http import (
    HTTPMessage,
    from_http_event,
    to_binary_event,
    to_structured_event,
)
from cloudevents.core.v1.event import CloudEvent

from channels.cehttp import Reply, ServerOptions
from channels.dumper import DumperServer
from channels.inmemory import FanoutOptions, InMemoryChannelServer
from support import free_port

ROOT = Path(__file__).resolve().parents[1]


def sample_event(event_id: str = "m-1", data: object = None, **attrs: object) -> CloudEvent:
    attributes: dict[str, object] = {
        "id": event_id,
        "source": 'https://sqs.example/123/orders "ü" 100%',  # needs percent-encoding in headers
        "type": "aws.sqs.message",
        "specversion": "1.0",
        "time": datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC),
        "datacontenttype": "application/json",
        "sqsgroup": "g1",
        **attrs,
    }
    if data is None:
        data = {"MessageId": event_id, "Body": "héllo wörld", "Attributes": {"SentTimestamp": "1"}}
    return CloudEvent(attributes, data)




@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as es:
        yield es


def dumper(stack: ExitStack, **kwargs: object) -> DumperServer:
    kwargs.setdefault("out", io.StringIO())
    kwargs.setdefault("keep", True)
    return stack.enter_context(DumperServer("127.0.0.1", 0, **kwargs))  # type: ignore[arg-type]


def channel(stack: ExitStack, *subscribers: str, **options: object) -> InMemoryChannelServer:
    opts = FanoutOptions(**options) if options else None  # type: ignore[arg-type]
    return stack.enter_context(InMemoryChannelServer("127.0.0.1", 0, list(subscribers), options=opts))


def post(url: str, message: HTTPMessage, session: requests.Session | None = None) -> requests.Response:
    return (session or requests).post(url, headers=message.headers, data=message.body, timeout=30)


def received_as_sdk_event(d: DumperServer, index: int = 0) -> CloudEvent:
    r = d.received[index]
    return from_http_event(HTTPMessage(headers=dict(r.headers), body=r.body))  # type: ignore[return-value]


# --- pass-through ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_event_reaches_both_subscribers_unchanged(stack: ExitStack, mode: str) -> None:
    d1, d2 = dumper(stack), dumper(stack)
    ch = channel(stack, d1.url, d2.url)
    sent = sample_event()
    message = to_binary_event(sent) if mode == "binary" else to_structured_event(sent)
    if mode == "binary":
        message.headers["traceparent"] = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

    response = post(ch.url, message)

    assert response.status_code == 202, response.text
    for d in (d1, d2):
        assert len(d.received) == 1
        got = d.received[0]
        assert got.body == message.body  # byte for byte
        for name, value in message.headers.items():
            assert got.headers[name.lower()] == value  # same ce-* / content-type values
        event = received_as_sdk_event(d)
        assert event.get_attributes() == sent.get_attributes()
        assert event.get_data() == sent.get_data()
        # The dumper decoded the percent-encoded header / the JSON document the same way.
        assert d.events[0]["source"] == sent.get_source()
        assert d.events[0]["data"] == sent.get_data()
        assert d.events[0]["sqsgroup"] == "g1"
    assert ch.counts.received == ch.counts.delivered == 1
    assert ch.counts.failed == 0


def test_chunked_request_body_is_accepted(stack: ExitStack) -> None:
    d = dumper(stack)
    ch = channel(stack, d.url)
    message = to_binary_event(sample_event())
    response = requests.post(ch.url, headers=message.headers, data=iter([message.body[:5], message.body[5:]]))
    assert response.status_code == 202, response.text
    assert d.received[0].body == message.body


# --- fan-out outcomes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        (200, 200, 202),
        (200, 503, 502),
        (503, 200, 502),
        (200, 429, 502),
        (200, 400, 400),
        (404, 200, 404),
        (400, 503, 502),  # a retryable failure wins: the poller must try again
        (200, 302, 502),  # redirects are not followed
    ],
)
def test_channel_answers_2xx_only_when_every_subscriber_did(
    stack: ExitStack, first: int, second: int, expected: int
) -> None:
    d1 = dumper(stack, respond=lambda event, headers: first)
    d2 = dumper(stack, respond=lambda event, headers: second)
    ch = channel(stack, d1.url, d2.url)

    response = post(ch.url, to_binary_event(sample_event()))

    assert response.status_code == expected, response.text
    if expected != 202:
        assert "\n" not in response.text.strip()  # one-line reason
        assert ch.counts.failed == 1 and ch.counts.delivered == 0
    else:
        assert ch.counts.delivered == 1


def test_channel_answers_502_when_a_subscriber_is_down(stack: ExitStack) -> None:
    d = dumper(stack)
    ch = channel(stack, d.url, f"http://127.0.0.1:{free_port()}/", connect_timeout=1.0)
    response = post(ch.url, to_binary_event(sample_event()))
    assert response.status_code == 502
    assert "refused" in response.text.lower()
    assert len(d.received) == 1  # the live one got it (and gets it again on the retry)


def test_per_event_decision_400_for_some_ids(stack: ExitStack) -> None:
    d1 = dumper(stack)
    d2 = dumper(stack, respond=lambda event, headers: 400 if event["id"].startswith("bad") else None)
    ch = channel(stack, d1.url, d2.url)
    statuses = {i: post(ch.url, to_binary_event(sample_event(i))).status_code for i in ("ok-1", "bad-1", "ok-2")}
    assert statuses == {"ok-1": 202, "bad-1": 400, "ok-2": 202}
    assert [e["id"] for e in d2.events] == ["ok-1", "ok-2"]  # refused ones are not recorded
    assert d2.counts.refused == 1


def test_subscriber_timeout_is_502(stack: ExitStack) -> None:
    slow = dumper(stack, respond=lambda event, headers: time.sleep(2))
    ch = channel(stack, slow.url, timeout=0.5)
    start = time.monotonic()
    response = post(ch.url, to_binary_event(sample_event()))
    assert response.status_code == 502
    assert "timeout" in response.text
    assert time.monotonic() - start < 1.8


def test_slow_subscriber_does_not_block_other_requests(stack: ExitStack) -> None:
    def respond(event: dict, headers: object) -> None:
        if event["id"] == "slow":
            time.sleep(1.5)

    d1, d2 = dumper(stack, respond=respond), dumper(stack)
    ch = channel(stack, d1.url, d2.url)
    slow_status: list[int] = []
    slow = threading.Thread(target=lambda: slow_status.append(post(ch.url, to_binary_event(sample_event("slow"))).status_code))
    slow.start()
    time.sleep(0.1)
    start = time.monotonic()
    with requests.Session() as session:
        for i in range(20):
            assert post(ch.url, to_binary_event(sample_event(f"fast-{i}")), session).status_code == 202
    assert time.monotonic() - start < 1.0  # not queued behind the slow one
    slow.join()
    assert slow_status == [202]


# --- the dumper ------------------------------------------------------------------------------


def test_dumper_prints_one_json_line_per_event(stack: ExitStack) -> None:
    out = io.StringIO()
    d = dumper(stack, out=out)
    events = [
        to_binary_event(sample_event("json")),
        to_binary_event(sample_event("text", "plain text ✓", datacontenttype="text/plain")),
        to_binary_event(sample_event("bytes", b"\xff\x00\xfe", datacontenttype="application/octet-stream")),
        to_structured_event(sample_event("structured")),
    ]
    for message in events:
        assert post(d.url, message).status_code == 200

    lines = out.getvalue().splitlines()
    assert len(lines) == 4
    docs = [json.loads(line) for line in lines]
    assert [doc["id"] for doc in docs] == ["json", "text", "bytes", "structured"]
    assert docs[0]["data"]["Body"] == "héllo wörld"
    assert docs[0]["time"] == "2026-01-02T03:04:05.678000Z"
    assert docs[1]["data"] == "plain text ✓"
    assert base64.b64decode(docs[2]["data_base64"]) == b"\xff\x00\xfe" and "data" not in docs[2]
    assert docs[3]["data"]["MessageId"] == "structured"
    for doc in docs:
        assert {"specversion", "id", "source", "type"} <= doc.keys()


def test_dumper_pretty_output(stack: ExitStack) -> None:
    out = io.StringIO()
    d = dumper(stack, out=out, pretty=True)
    assert post(d.url, to_binary_event(sample_event("p1"))).status_code == 200
    assert post(d.url, to_binary_event(sample_event("p2"))).status_code == 200
    text = out.getvalue()
    assert text.count("\n") > 10  # indented
    decoder = json.JSONDecoder()
    first, end = decoder.raw_decode(text)
    second, _ = decoder.raw_decode(text[end:].lstrip())
    assert (first["id"], second["id"]) == ("p1", "p2")


def test_dumper_hooks(stack: ExitStack) -> None:
    seen: list[tuple[str, str]] = []
    d = dumper(
        stack,
        on_event=lambda event, headers: seen.append((event["id"], headers["ce-type"])),
        respond=lambda event, headers: Reply(418, "teapot") if event["id"] == "tea" else None,
    )
    assert post(d.url, to_binary_event(sample_event("a"))).status_code == 200
    response = post(d.url, to_binary_event(sample_event("tea")))
    assert (response.status_code, response.text.strip()) == (418, "teapot")
    assert seen == [("a", "aws.sqs.message")]
    assert d.counts.received == 2 and d.counts.accepted == 1 and d.counts.refused == 1


# --- not CloudEvents -------------------------------------------------------------------------

BASE = {"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/s", "ce-type": "t"}


@pytest.mark.parametrize(
    ("headers", "body", "reason"),
    [
        ({"Content-Type": "application/json"}, b"{}", "not a CloudEvent"),
        ({k: v for k, v in BASE.items() if k != "ce-id"}, b"", "id"),
        ({**BASE, "ce-specversion": "0.2"}, b"", "specversion"),
        ({**BASE, "ce-Bad_Name": "x"}, b"", "invalid attribute name"),
        ({"Content-Type": "application/cloudevents+json"}, b"{not json", "not valid JSON"),
        ({"Content-Type": "application/cloudevents+json"}, b'{"specversion":"1.0","id":"1","source":"/s"}', "type"),
        ({"Content-Type": "application/cloudevents+json"}, b"[1]", "JSON object"),
        ({"Content-Type": "application/cloudevents-batch+json"}, b"[]", "batch"),
    ],
)
@pytest.mark.parametrize("server", ["channel", "dumper"])
def test_non_cloudevent_is_400_with_one_line(
    stack: ExitStack, server: str, headers: dict[str, str], body: bytes, reason: str
) -> None:
    d = dumper(stack)
    target = channel(stack, d.url) if server == "channel" else d
    response = requests.post(target.url, headers=headers, data=body, timeout=10)
    assert response.status_code == 400
    assert reason in response.text and response.text.count("\n") == 1
    assert d.received == []
    assert target.counts.invalid == 1


def test_only_post_is_allowed(stack: ExitStack) -> None:
    d = dumper(stack)
    response = requests.get(d.url, timeout=10)
    assert response.status_code == 405 and response.headers["Allow"] == "POST"


# --- concurrency and lifecycle ---------------------------------------------------------------


def test_200_events_from_8_keepalive_threads_all_arrive(stack: ExitStack) -> None:
    d1, d2 = dumper(stack), dumper(stack)
    ch = channel(stack, d1.url, d2.url)
    failures: list[str] = []

    def send(worker: int) -> None:
        with requests.Session() as session:
            for i in range(25):
                event = sample_event(f"w{worker}-{i}", {"n": i, "pad": "x" * (i * 400)})
                message = to_binary_event(event) if i % 2 else to_structured_event(event)
                response = post(ch.url, message, session)
                if response.status_code != 202:
                    failures.append(f"{event.get_id()}: {response.status_code} {response.text}")

    threads = [threading.Thread(target=send, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert failures == []
    expected = {f"w{w}-{i}" for w in range(8) for i in range(25)}
    for d in (d1, d2):
        ids = [e["id"] for e in d.events]
        assert len(ids) == 200 and set(ids) == expected  # each exactly once
    assert ch.counts.delivered == 200


def test_stop_with_open_keepalive_connection_is_prompt() -> None:
    d = DumperServer(out=io.StringIO()).start()
    session = requests.Session()
    assert post(d.url, to_binary_event(sample_event()), session).status_code == 200
    start = time.monotonic()
    d.stop()
    assert time.monotonic() - start < 2
    assert not d.serving
    with pytest.raises(requests.ConnectionError):
        post(d.url, to_binary_event(sample_event()), session)
    session.close()


def test_stop_cuts_requests_still_running_after_the_grace_quietly(capfd: pytest.CaptureFixture[str]) -> None:
    d = DumperServer(
        out=io.StringIO(),
        respond=lambda event, headers: time.sleep(1.0),
        server_options=ServerOptions(stop_grace=0.2),
    ).start()
    errors: list[BaseException] = []

    def send() -> None:
        try:
            post(d.url, to_binary_event(sample_event()))
        except requests.ConnectionError as exc:
            errors.append(exc)

    t = threading.Thread(target=send)
    t.start()
    time.sleep(0.2)
    start = time.monotonic()
    d.stop()
    assert time.monotonic() - start < 1.0
    t.join(5)
    assert len(errors) == 1  # no answer: the sender retries, as with any crash
    time.sleep(1.0)  # let the handler thread try to answer on the closed socket
    assert "Traceback" not in capfd.readouterr().err


def test_serve_forever_and_stop_from_another_thread() -> None:
    d = DumperServer(out=io.StringIO())
    t = threading.Thread(target=d.serve_forever)
    t.start()
    assert post(d.url, to_binary_event(sample_event())).status_code == 200
    d.stop()
    t.join(5)
    assert not t.is_alive()


def test_channel_rejects_bad_subscriber_urls() -> None:
    with pytest.raises(ValueError, match="not an http"):
        InMemoryChannelServer("127.0.0.1", 0, ["ftp://x/"])
    with pytest.raises(ValueError, match="at least one"):
        InMemoryChannelServer("127.0.0.1", 0, [])


# --- the CLI entry points --------------------------------------------------------------------


def _spawn(code: str) -> tuple[subprocess.Popen[str], str]:
    """Start a serve_* function in a child; return it and its URL (from the start line)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import logging; logging.basicConfig(level=logging.INFO); " + code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert "listening on http://127.0.0.1:" in line, line
    url = line.split("listening on ", 1)[1].split(",", 1)[0].strip()
    return proc, url


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_channel_and_dumper_stop_cleanly_on_signal(sig: signal.Signals) -> None:
    dump_proc, dump_url = _spawn("from channels.dumper import serve_dumper; serve_dumper(0, False)")
    chan_proc = None
    try:
        chan_proc, chan_url = _spawn(
            f"from channels.inmemory import serve_channel; serve_channel(0, [{dump_url!r}])"
        )
        outputs = {}
        with requests.Session() as session:  # keep-alive connection left open on purpose
            assert post(chan_url, to_binary_event(sample_event("cli")), session).status_code == 202
            for name, proc in (("channel", chan_proc), ("dumper", dump_proc)):
                proc.send_signal(sig)
                out, err = proc.communicate(timeout=10)
                assert proc.returncode == 0, err
                assert "Traceback" not in err
                assert " stopped: " in err
                outputs[name] = out
        assert outputs["channel"] == ""  # logs go to stderr
        assert [json.loads(line)["id"] for line in outputs["dumper"].splitlines()] == ["cli"]
    finally:
        for proc in (chan_proc, dump_proc):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def test_serve_dumper_prints_events_to_stdout() -> None:
    proc, url = _spawn("from channels.dumper import serve_dumper; serve_dumper(0, False)")
    try:
        assert post(url, to_binary_event(sample_event("stdout-1"))).status_code == 200
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    [line] = out.splitlines()
    assert json.loads(line)["id"] == "stdout-1"
