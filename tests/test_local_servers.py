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
import socket
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

from poller.kit.cehttp import Reply, ServerOptions
from poller.kit.dumper import DumperServer
from poller.kit.inmemory import FanoutOptions, InMemoryChannelServer

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
    slow = threading.Thread(
        target=lambda: slow_status.append(post(ch.url, to_binary_event(sample_event("slow"))).status_code))
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


# --- batched content mode (the poller's --http-mode batch) ---------------------------------------


def batch_body(*ids: str) -> bytes:
    return b"[" + b",".join(to_structured_event(sample_event(i)).body for i in ids) + b"]"


BATCH_HEADERS = {"Content-Type": "application/cloudevents-batch+json; charset=utf-8"}


@pytest.mark.parametrize("server", ["channel", "dumper"])
def test_a_batch_is_taken_event_by_event(stack: ExitStack, server: str) -> None:
    d = dumper(stack)
    target = channel(stack, d.url) if server == "channel" else d
    response = requests.post(target.url, headers=BATCH_HEADERS, data=batch_body("a", "b", "c"), timeout=10)
    assert 200 <= response.status_code < 300 and not response.content
    assert sorted(e["id"] for e in d.events) == ["a", "b", "c"]
    assert d.counts.accepted == 3


@pytest.mark.parametrize("server", ["channel", "dumper"])
def test_a_batch_partly_refused_lists_the_refused_as_batch_item_failures(stack: ExitStack, server: str) -> None:
    d = dumper(stack, respond=lambda event, headers: 503 if event["id"] in ("b", "d") else None)
    target = channel(stack, d.url) if server == "channel" else d
    response = requests.post(target.url, headers=BATCH_HEADERS, data=batch_body("a", "b", "c", "d"), timeout=10)
    assert response.status_code == 200
    assert response.json() == {"batchItemFailures": [{"itemIdentifier": "b"}, {"itemIdentifier": "d"}]}
    assert sorted(e["id"] for e in d.events) == ["a", "c"]
    every = requests.post(target.url, headers=BATCH_HEADERS, data=batch_body("b", "d"), timeout=10)
    assert every.status_code in (502, 503)  # none taken: the refusal itself


# --- not CloudEvents -------------------------------------------------------------------------

BASE = {"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/s", "ce-type": "t"}


@pytest.mark.parametrize(
    ("headers", "body", "reason"),
    [
        ({"Content-Type": "application/json"}, b"{}", "not a CloudEvent"),
        ({k: v for k, v in BASE.items() if k != "ce-id"}, b"", "id"),
        ({**BASE, "ce-specversion": "0.2"}, b"", "specversion"),
        ({**BASE, "ce-Bad_Name": "x"}, b"", "bad_name"),
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


# --- HTTP-level limits (raw sockets: the clients a library would not be) ---------------------

RAW_HEAD = (b"POST / HTTP/1.1\r\nHost: x\r\nce-specversion: 1.0\r\nce-id: raw-1\r\nce-source: /s\r\n"
            b"ce-type: t\r\nContent-Type: text/plain\r\n")


def raw_request(body: bytes = b"hello", *, chunked: bool = False) -> tuple[bytes, bytes]:
    """(head, body) of a valid binary-mode CloudEvent request, sized or chunked."""
    if chunked:
        return RAW_HEAD + b"Transfer-Encoding: chunked\r\n\r\n", b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    return RAW_HEAD + b"Content-Length: %d\r\n\r\n" % len(body), body


def raw_connect(server: DumperServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def read_response(sock: socket.socket, buf: bytes = b"") -> tuple[int, bytes, bytes]:
    """(status, body, bytes after it) of one Content-Length response on a kept-alive connection."""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        assert data, f"closed without a whole answer: {buf!r}"
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(rest) < length:
        rest += sock.recv(65536)
    return int(head.split(b" ", 2)[1]), rest[:length], rest[length:]


def read_until_closed(sock: socket.socket) -> tuple[int, bytes]:
    """(status, everything) of an answer after which the server closes the connection."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        assert data, "reset without an answer"  # closed with our bytes unread: the answer came first
    return int(data.split(b" ", 2)[1]), data


@pytest.mark.parametrize(("size_line", "data"), [
    (b"-1", b""),  # int("-1", 16) is -1, and reading -1 bytes was reading to EOF: no limit
    (b"+3", b"abc"), (b"0x3", b"abc"), (b"0_3", b"abc"),  # int(x, 16) takes these too
    (b"zz", b"abc"), (b"", b"abc"),
    (b"3", b"abcdef"),  # more data than the size: not followed by CRLF
])
def test_chunk_sizes_must_be_plain_hex(stack: ExitStack, size_line: bytes, data: bytes) -> None:
    d = dumper(stack, server_options=ServerOptions(max_body=1024))
    head, _ = raw_request(chunked=True)
    # The rest of a valid body follows, so that a size taken as valid makes a 200.
    rest = b"\r\n" + data + b"\r\n0\r\n\r\n" if data else b"\r\n"
    with raw_connect(d) as sock:
        sock.sendall(head + size_line + rest)  # and not closed: "-1" must not wait for EOF
        status, answer = read_until_closed(sock)
    assert status == 400 and b"malformed chunked body" in answer
    assert d.received == []


def test_chunked_body_with_extensions_and_trailers_is_accepted(stack: ExitStack) -> None:
    d = dumper(stack)
    head, _ = raw_request(chunked=True)
    with raw_connect(d) as sock:
        sock.sendall(head + b"3;ext=1\r\nhel\r\nA\r\nlo world!!\r\n0\r\nX-Trailer: 1\r\n\r\n")
        assert read_response(sock)[:2] == (200, b"")
        sock.sendall(b"".join(raw_request(b"again")))  # and the connection is kept
        assert read_response(sock)[:2] == (200, b"")
    assert [r.body for r in d.received] == [b"hello world!!", b"again"]


def trickle(sock: socket.socket, data: bytes, stop: threading.Event, every: float = 0.05) -> threading.Thread:
    """Sends ``data`` one byte every ``every`` seconds from a thread, until done, stopped or the
    server closes."""
    def run() -> None:
        try:
            for i in range(len(data)):
                if stop.wait(every):
                    return
                sock.sendall(data[i:i + 1])
        except OSError:
            pass
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("part", ["head", "body", "chunked"])
def test_a_trickled_request_gets_408_and_is_closed(stack: ExitStack, part: str) -> None:
    # Each byte comes well within any socket timeout, the whole request in no less than 7 s: a
    # per-recv timeout never fires, the request's deadline does.
    d = dumper(stack, server_options=ServerOptions(request_timeout=0.5))
    head, body = raw_request(b"x" * 150, chunked=part == "chunked")
    stop = threading.Event()
    with raw_connect(d) as sock:
        began = time.monotonic()
        if part == "head":
            sender = trickle(sock, head + body, stop)
        else:
            sock.sendall(head)
            sender = trickle(sock, body, stop)
        try:
            status, answer = read_until_closed(sock)
        finally:
            stop.set()
            sender.join(5)
        assert time.monotonic() - began < 5  # generous: the trickle needs > 7 s
    assert status == 408 and b"Connection: close" in answer
    assert d.received == [] and d.counts.received == 0


def test_the_request_deadline_starts_with_the_request_not_the_idle_wait(stack: ExitStack) -> None:
    d = dumper(stack, server_options=ServerOptions(request_timeout=0.5))
    with raw_connect(d) as sock:
        sock.sendall(b"".join(raw_request(b"1")))
        status, _, rest = read_response(sock)
        assert status == 200
        time.sleep(0.8)  # idle on the kept-alive connection for longer than request_timeout
        sock.sendall(b"".join(raw_request(b"2")))
        assert read_response(sock, rest)[0] == 200
    assert [r.body for r in d.received] == [b"1", b"2"]


def handler_threads() -> int:
    return sum("process_request_thread" in t.name for t in threading.enumerate())


def test_connections_beyond_the_cap_are_refused_at_once_without_a_thread(stack: ExitStack) -> None:
    d = dumper(stack, server_options=ServerOptions(max_connections=3))
    threads_before = handler_threads()
    held = [stack.enter_context(raw_connect(d)) for _ in range(3)]
    for sock in held:  # each admitted (answered), then idle and kept alive
        sock.sendall(b"".join(raw_request()))
        assert read_response(sock)[0] == 200
    for _ in range(5):
        with raw_connect(d) as extra:
            status, answer = read_until_closed(extra)  # answered and closed, not left waiting
        assert status == 503 and b"Retry-After: 1" in answer and b"too many connections" in answer
    assert handler_threads() - threads_before <= 3
    held[0].close()  # a slot frees once the server has seen the close
    deadline = time.monotonic() + 10
    while True:
        with raw_connect(d) as sock:
            try:
                sock.sendall(b"".join(raw_request(b"after")))
                status = read_response(sock)[0]
            except (AssertionError, ConnectionError):
                status = 503  # refused (503 and closed) before the slot was free
        if status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert status == 200
    for sock in held[1:]:  # the others were kept all along
        sock.sendall(b"".join(raw_request()))
        assert read_response(sock)[0] == 200


@pytest.mark.parametrize("options", [
    {"request_timeout": 0}, {"request_timeout": -1.0}, {"max_connections": 0},
])
def test_server_options_are_checked(options: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ServerOptions(**options)  # type: ignore[arg-type]


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
    dump_proc, dump_url = _spawn("from poller.kit.dumper import serve_dumper; serve_dumper(0, False)")
    chan_proc = None
    try:
        chan_proc, chan_url = _spawn(
            f"from poller.kit.inmemory import serve_channel; serve_channel(0, [{dump_url!r}])"
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
    proc, url = _spawn("from poller.kit.dumper import serve_dumper; serve_dumper(0, False)")
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
