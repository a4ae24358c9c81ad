"""channels/wire.py against real servers on 127.0.0.1: the DumperServer, and tiny raw-socket
servers written here for the edges (chunked + trailers, Connection: close, 1xx, idle close,
garbage, silence, bodies to drain, TLS with a self-signed certificate). No mocks.
"""

from __future__ import annotations

import datetime
import io
import ipaddress
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from channels.base import Message, Outcome
from channels.dumper import DumperServer
from channels.events import EventFormat
from channels.http import HttpConfig
from channels import wire
from channels.wire import HttpConnection, ProtocolError

SOURCE = "http://localhost:4566/000000000000/orders"


def make_message(i: int = 0, **message_attributes: Any) -> Message:
    return Message(id=f"m-{i}", body=f'{{"n": {i}}}', ack_id=f"h-{i}",
                   attributes={"SentTimestamp": "1700000000123"},
                   message_attributes=message_attributes)


# -- a raw-socket server -----------------------------------------------------------------------


class Reader:
    """Reads requests (head + Content-Length body) from one accepted socket."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.buf = b""

    def request(self) -> bytes | None:
        """One whole request, or None at EOF."""
        while b"\r\n\r\n" not in self.buf:
            data = self.conn.recv(65536)
            if not data:
                return None
            self.buf += data
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(rest) < length:
            rest += self.conn.recv(65536)
        self.buf = rest[length:]
        return head + b"\r\n\r\n" + rest[:length]


Handler = Callable[["RawServer", socket.socket, Reader], None]


class RawServer:
    """Accepts on 127.0.0.1 and runs ``handler(server, conn, reader)`` per connection, in a thread.

    Counts connections and requests; ``tls``: a server-side SSLContext to wrap connections with.
    """

    def __init__(self, handler: Handler, tls: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.tls = tls
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.requests: list[bytes] = []
        self._open: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self.stopped = self._stop = threading.Event()
        self._lock = threading.Lock()
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self._open.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(10)
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
                with self._lock:
                    self._open.append(conn)
            self.handler(self, conn, Reader(conn))
        except OSError:
            pass
        finally:
            conn.close()

    def record(self, request: bytes) -> None:
        with self._lock:
            self.requests.append(request)

    def close(self) -> None:
        self._stop.set()
        self._acceptor.join(5)
        self.listener.close()
        with self._lock:
            for conn in self._open:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for thread in self._threads:
            thread.join(5)
            assert not thread.is_alive()


@pytest.fixture
def serve() -> Iterator[Callable[..., RawServer]]:
    servers: list[RawServer] = []

    def start(handler: Handler, tls: ssl.SSLContext | None = None) -> RawServer:
        servers.append(RawServer(handler, tls))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def answering(*responses: bytes, then_close: bool = False) -> Handler:
    """Answers each request on a connection with the next of ``responses`` (cycling)."""
    def handler(server: RawServer, conn: socket.socket, reader: Reader) -> None:
        i = 0
        while (request := reader.request()) is not None:
            server.record(request)
            conn.sendall(responses[i % len(responses)])
            i += 1
            if then_close:
                return
    return handler


def connect(server: RawServer, timeout: float = 5.0, **kwargs: Any) -> HttpConnection:
    return HttpConnection("127.0.0.1", server.port, tls=False, timeout=timeout, **kwargs)


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


# -- against the DumperServer ------------------------------------------------------------------


def test_binary_events_reach_the_dumper_over_one_keepalive_connection() -> None:
    fmt = EventFormat(SOURCE)
    with DumperServer(out=io.StringIO(), keep=True) as dumper:
        conn = HttpConnection("127.0.0.1", dumper.port, tls=False, timeout=5,
                              headers={"User-Agent": "t", **fmt.http_binary_constant()})
        try:
            for i in range(20):
                headers, body = fmt.http_binary_message(make_message(i))
                assert conn.post("/", headers, body) == 200
            sock = conn._sock
            assert conn.post("/x?y=1", *fmt.http_binary_message(make_message(20))) == 200
            assert conn._sock is sock  # the same connection all along
        finally:
            conn.close()
        assert dumper.counts.accepted == 21
        got = dumper.received[3]
        expected, body = fmt.http_binary(make_message(3))
        assert got.body == body
        assert {k.lower(): v for k, v in expected.items()}.items() <= dict(got.headers).items()
        assert got.headers["host"] == f"127.0.0.1:{dumper.port}"
        assert got.headers["user-agent"] == "t"
        assert [e["id"] for e in dumper.events] == [f"m-{i}" for i in range(21)]


def test_error_statuses_are_returned_and_the_connection_kept() -> None:
    answers = {"bad": 400, "busy": 503, "gone": 410}
    with DumperServer(out=io.StringIO(), respond=lambda event, headers: answers.get(event["id"])) as dumper:
        fmt = EventFormat(SOURCE)
        with HttpConnection("127.0.0.1", dumper.port, tls=False, timeout=5,
                            headers=fmt.http_binary_constant()) as conn:
            for event_id, status in [("bad", 400), ("ok", 200), ("busy", 503), ("gone", 410), ("ok", 200)]:
                message = Message(id=event_id, body="{}", ack_id="h")
                assert conn.post("/", *fmt.http_binary_message(message)) == status
            # a request that is not a CloudEvent: the dumper answers 400 with a body, drained
            assert conn.post("/", [("Content-Type", "text/plain")], b"hello") == 400
            assert conn.post("/", *fmt.http_binary_message(make_message())) == 200


# -- the channel on the new connection ---------------------------------------------------------


def run_channel(config: HttpConfig, messages: list[Message],
                fmt: EventFormat | None = None) -> dict[str, tuple[Outcome, str]]:
    outcomes: dict[str, tuple[Outcome, str]] = {}
    done = threading.Event()

    def report(message: Message, outcome: Outcome, reason: str) -> None:
        outcomes[message.id] = (outcome, reason)
        if len(outcomes) == len(messages):
            done.set()

    channel = config.create(SOURCE)
    if fmt is not None:
        channel._format = fmt
    with channel:
        channel.publish(messages, report)
        assert done.wait(20), outcomes
    return outcomes


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_channel_outcomes_and_headers_on_the_wire(mode: str) -> None:
    answers = {"m-1": 400, "m-2": 503, "m-3": 429}
    overrides = {"tenant": "acme co", "region": "eu"}  # "region" also comes from the message
    with DumperServer(out=io.StringIO(), keep=True,
                      respond=lambda event, headers: answers.get(event["id"])) as dumper:
        config = HttpConfig(sink=dumper.url + "events?x=1", mode=mode, overrides=overrides, concurrency=2)
        messages = [make_message(i, region={"DataType": "String", "StringValue": "us"}) for i in range(5)]
        outcomes = run_channel(config, messages)
        assert {k: v[0] for k, v in outcomes.items()} == {
            "m-0": Outcome.ACK, "m-1": Outcome.REJECT, "m-2": Outcome.RETRY, "m-3": Outcome.RETRY,
            "m-4": Outcome.ACK,
        }
        assert outcomes["m-2"][1].endswith("answered HTTP 503")
        got = {r.event["id"]: r for r in dumper.received}
        fmt = EventFormat(SOURCE, overrides=overrides)
        assert got["m-0"].event["region"] == "eu" and got["m-0"].event["tenant"] == "acme co"
        if mode == "binary":
            expected, body = fmt.http_binary(messages[0])
            assert got["m-0"].body == body
            assert {k.lower(): v for k, v in expected.items()}.items() <= dict(got["m-0"].headers).items()
            assert got["m-0"].headers["ce-tenant"] == "acme%20co"
        else:
            assert got["m-0"].headers["content-type"] == "application/cloudevents+json; charset=utf-8"
        assert got["m-0"].headers["user-agent"] == "sqs-poller"


class _CrlfFormat(EventFormat):
    """Puts a CR/LF in one message's header, as no real mapping can: the channel must REJECT."""

    def http_binary_message(self, message: Message) -> tuple[list[tuple[str, str]], bytes]:
        headers, body = super().http_binary_message(message)
        if message.id == "m-0":
            headers.append(("ce-evil", "x\r\nInjected: 1"))
        return headers, body


def test_channel_rejects_a_header_it_cannot_send_and_the_thread_lives_on() -> None:
    with DumperServer(out=io.StringIO(), keep=True) as dumper:
        config = HttpConfig(sink=dumper.url, concurrency=1)
        outcomes = run_channel(config, [make_message(0), make_message(1)], _CrlfFormat(SOURCE))
        assert outcomes["m-0"][0] is Outcome.REJECT and "invalid HTTP header" in outcomes["m-0"][1]
        assert outcomes["m-1"] == (Outcome.ACK, "")
        assert [r.event["id"] for r in dumper.received] == ["m-1"]


def test_channel_retries_garbage_and_silence(serve: Callable[..., RawServer]) -> None:
    garbage = serve(answering(b"SPAM SPAM SPAM\r\n\r\n"))
    config = HttpConfig(sink=f"http://127.0.0.1:{garbage.port}/", concurrency=1)
    outcomes = run_channel(config, [make_message(0), make_message(1)])
    for outcome, reason in outcomes.values():  # one attempt each: the worker retries
        assert outcome is Outcome.RETRY and "ProtocolError" in reason
    assert garbage.connections == 2  # closed after the garbage: a new one for the next message

    silent = serve(lambda server, conn, reader: reader.request() and server.stopped.wait(5))
    config = HttpConfig(sink=f"http://127.0.0.1:{silent.port}/", concurrency=1, timeout=0.3)
    outcome, reason = run_channel(config, [make_message()])["m-0"]
    assert outcome is Outcome.RETRY and "TimeoutError" in reason


# -- request building --------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [
    {"ce-id": "a\r\nX-Injected: 1"}, {"ce-id": "a\nb"}, {"ce-id": "a\rb"}, {"ce-id": "a\0b"},
    [("ce id", "v")], [("", "v")], [("ce-id:", "v")], [(" folded", "v")], {"ce-id": "\u2615"},
])
def test_invalid_headers_raise_valueerror_before_sending(serve: Callable[..., RawServer], headers: Any) -> None:
    server = serve(answering(OK))
    with connect(server) as conn:
        assert conn.post("/", {"a": "b"}, b"1") == 200
        with pytest.raises(ValueError):
            conn.post("/", headers, b"2")
        assert conn.post("/", [], b"3") == 200  # the connection was not touched
    assert server.connections == 1
    assert [r.rsplit(b"\r\n\r\n", 1)[1] for r in server.requests] == [b"1", b"3"]


def test_request_is_one_well_formed_message(serve: Callable[..., RawServer]) -> None:
    server = serve(answering(OK))
    with connect(server, headers=[("User-Agent", "u")]) as conn:
        assert conn.post("/p?q=1", {"Content-Type": "text/plain", "ce-x": "caf\u00e9"}, b"body") == 200
        assert conn.post("/p?q=1", (), b"") == 200
        with pytest.raises(ValueError):
            conn.post("/a b", (), b"")
    assert server.requests[0] == (
        b"POST /p?q=1 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAccept-Encoding: identity\r\nUser-Agent: u\r\n"
        b"Content-Type: text/plain\r\nce-x: caf\xe9\r\nContent-Length: 4\r\n\r\nbody" % server.port
    )
    assert server.requests[1].endswith(b"User-Agent: u\r\nContent-Length: 0\r\n\r\n")


# -- response framing --------------------------------------------------------------------------


def test_chunked_response_with_extensions_and_trailers(serve: Callable[..., RawServer]) -> None:
    def handler(server: RawServer, conn: socket.socket, reader: Reader) -> None:
        while (request := reader.request()) is not None:
            server.record(request)
            for part in (b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\n",
                         b"5;ext=1\r\nhello\r\n", b"1A\r\n" + b"x" * 26 + b"\r\n",
                         b"0\r\nX-Trailer: 1\r\nX-Other: 2\r\n", b"\r\n"):
                conn.sendall(part)
                time.sleep(0.01)  # arrive in pieces

    server = serve(handler)
    with connect(server) as conn:
        assert [conn.post("/", (), b"%d" % i) for i in range(3)] == [202, 202, 202]
    assert server.connections == 1 and len(server.requests) == 3


def test_chunked_response_in_one_piece(serve: Callable[..., RawServer]) -> None:
    server = serve(answering(b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n"
                             b"3\r\nabc\r\n0\r\n\r\n"))
    with connect(server) as conn:
        assert [conn.post("/", (), b"") for _ in range(3)] == [200, 200, 200]
    assert server.connections == 1


def test_bodies_are_drained_before_the_next_request(serve: Callable[..., RawServer]) -> None:
    big = b"y" * 300_000
    server = serve(answering(
        b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n\r\nbad request",
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(big), big),
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",  # bare LF line ends
    ))
    with connect(server) as conn:
        assert [conn.post("/", (), b"") for _ in range(6)] == [400, 200, 204, 304, 200, 400]
    assert server.connections == 1


def test_connection_close_and_http10(serve: Callable[..., RawServer]) -> None:
    cases = [
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", 3),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nbody until close", 3),  # no length
        (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", 3),
        (b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n", 1),
        (b"HTTP/1.1 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 0\r\n\r\n", 3),
    ]
    for response, connections in cases:
        # The server closes after a Connection: close answer; the client must not reuse it.
        server = serve(answering(response, then_close=connections > 1))
        with connect(server) as conn:
            assert [conn.post("/", (), b"") for _ in range(3)] == [200, 200, 200]
            assert (conn._sock is None) == (connections > 1)
        assert server.connections == connections, response


def test_interim_1xx_responses_are_skipped(serve: Callable[..., RawServer]) -> None:
    server = serve(answering(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"
    ))
    with connect(server) as conn:
        assert [conn.post("/", (), b"x") for _ in range(2)] == [201, 201]
    assert server.connections == 1


# -- broken connections ------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["close", "reset"])
def test_idle_keepalive_closed_by_server_is_reopened_transparently(
    serve: Callable[..., RawServer], how: str
) -> None:
    def handler(server: RawServer, conn: socket.socket, reader: Reader) -> None:
        request = reader.request()
        assert request is not None
        server.record(request)
        conn.sendall(OK)  # keep-alive, but then the server drops the idle connection
        if how == "reset":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST

    server = serve(handler)
    with connect(server) as conn:
        for _ in range(3):
            assert conn.post("/", (), b"x") == 200
            time.sleep(0.1)  # the server has closed it by now
    assert server.connections == 3 and len(server.requests) == 3


def test_fresh_connection_closed_without_answer_is_not_resent(serve: Callable[..., RawServer]) -> None:
    def handler(server: RawServer, conn: socket.socket, reader: Reader) -> None:
        if (request := reader.request()) is not None:
            server.record(request)  # and close without answering

    server = serve(handler)
    with connect(server) as conn:
        with pytest.raises(ConnectionResetError):
            conn.post("/", (), b"x")
    assert server.connections == 1 and len(server.requests) == 1


def test_reused_connection_is_resent_only_once(serve: Callable[..., RawServer]) -> None:
    def handler(server: RawServer, conn: socket.socket, reader: Reader) -> None:
        # The first connection answers one request; after that every request is read and the
        # connection closed without an answer.
        first = server.connections == 1
        while (request := reader.request()) is not None:
            server.record(request)
            if not first:
                return
            first = False
            conn.sendall(OK)
        
    server = serve(handler)
    with connect(server) as conn:
        assert conn.post("/", (), b"x") == 200
        with pytest.raises(ConnectionResetError):
            conn.post("/", (), b"y")  # no answer on the reused connection, nor on the new one
    assert server.connections == 2
    assert [r[-1:] for r in server.requests] == [b"x", b"y", b"y"]


@pytest.mark.parametrize("garbage", [
    b"SPAM\r\n\r\n", b"HTTP/2 200\r\n\r\n", b"HTTP/1.1 2000 OK\r\n\r\n", b"HTTP/1.1 abc OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1;" + b"e" * 70_000 + b"\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",  # then closed: truncated body
    b"HTTP/1.1 200 OK\r\n" + b"X-Long: " + b"a" * 70_000 + b"\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n" + b"X: 1\r\n" * 101 + b"\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\n" * 40,
    # Both framings (RFC 9112 6.3): a smuggling sign, whichever the server meant.
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: gzip\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcdef\r\n0\r\n\r\n",  # data > size
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n",
])
def test_garbage_is_a_protocol_error_and_the_next_post_uses_a_fresh_connection(
    serve: Callable[..., RawServer], garbage: bytes
) -> None:
    def handler(server: RawServer, conn: socket.socket, reader: Reader) -> None:
        while (request := reader.request()) is not None:
            server.record(request)
            if server.connections == 1:
                conn.sendall(garbage)
                return
            conn.sendall(OK)

    server = serve(handler)
    with connect(server) as conn:
        with pytest.raises(ProtocolError):
            conn.post("/", (), b"x")
        assert conn._sock is None  # closed
        assert conn.post("/", (), b"x") == 200
    assert server.connections == 2


def test_a_server_that_never_answers_times_out(serve: Callable[..., RawServer]) -> None:
    def handler(server: RawServer, conn: socket.socket, reader: Reader) -> None:
        request = reader.request()
        if request is not None:
            server.record(request)
            conn.sendall(b"HTTP/1.1 200 OK\r\n")  # half a head, then silence
        server.stopped.wait(3)

    server = serve(handler)
    with connect(server, timeout=0.3) as conn:
        began = time.monotonic()
        with pytest.raises(TimeoutError):
            conn.post("/", (), b"x")
        assert time.monotonic() - began < 2
        assert conn._sock is None


def trickling(response: bytes, every: float = 0.06, closed: threading.Event | None = None) -> Handler:
    """Answers each request with ``response``, one byte every ``every`` seconds; sets ``closed``
    when a send fails (the client closed the connection)."""
    def handler(server: RawServer, conn: socket.socket, reader: Reader) -> None:
        while (request := reader.request()) is not None:
            server.record(request)
            try:
                for i in range(len(response)):
                    conn.sendall(response[i:i + 1])
                    if server.stopped.wait(every):
                        return
            except OSError:
                if closed is not None:
                    closed.set()
                return
    return handler


TRICKLED = {  # each takes several seconds at one byte every 60 ms
    "head": b"HTTP/1.1 200 OK\r\nX-Slow: " + b"s" * 80 + b"\r\nContent-Length: 0\r\n\r\n",
    "body": b"HTTP/1.1 200 OK\r\nContent-Length: 80\r\n\r\n" + b"b" * 80,
    "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1\r\nc\r\n" * 20 + b"0\r\n\r\n",
}


@pytest.mark.parametrize("part", sorted(TRICKLED))
@pytest.mark.parametrize("call", ["post", "request"])
def test_the_timeout_bounds_the_whole_answer_not_each_read(
    serve: Callable[..., RawServer], part: str, call: str
) -> None:
    # Every byte comes well within the timeout, but the whole answer would take seconds: a
    # per-read timeout never fires, a deadline for the call does.
    closed = threading.Event()
    server = serve(trickling(TRICKLED[part], closed=closed))
    with connect(server, timeout=0.5) as conn:
        began = time.monotonic()
        with pytest.raises(TimeoutError):
            getattr(conn, call)("/", (), b"x")
        assert time.monotonic() - began < 3  # the trickle takes > 4 s; generous for a busy machine
        assert conn._sock is None
    assert closed.wait(5)  # the server saw the connection go
    assert len(server.requests) == 1  # not resent


def test_a_slow_answer_leaves_the_next_call_its_whole_timeout(serve: Callable[..., RawServer]) -> None:
    # The first answer comes in three reads: the socket's timeout is cut to what was left of
    # that call. The next call's deadline is a new one: the socket must get it back.
    def handler(server: RawServer, conn: socket.socket, reader: Reader) -> None:
        for pauses in ((0.6, 0.6), (1.4,)):
            if (request := reader.request()) is None:
                return
            server.record(request)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(pauses))
            for pause in pauses:
                if server.stopped.wait(pause):
                    return
                conn.sendall(b"x")

    server = serve(handler)
    with connect(server, timeout=2.0) as conn:
        assert conn.request("/", (), b"") == (200, b"xx")
        assert conn.request("/", (), b"") == (200, b"x")
    assert server.connections == 1


def wait_readable(sock: socket.socket | None) -> None:
    assert sock is not None
    readable, _, _ = select.select([sock], [], [], 5)
    assert readable, "nothing arrived on the idle connection"


@pytest.mark.parametrize("tls", [False, True])
def test_a_stray_response_on_an_idle_connection_is_never_taken_for_the_next_answer(
    serve: Callable[..., RawServer], certificate: tuple[Path, Path], tls: bool
) -> None:
    # A server answers, then sends a second response nobody asked for. Read as the answer to the
    # next request, its 500 would stand for a request the server never answered (or a 200 for
    # one it refused): the idle connection is readable, so it is dropped and a new one opened.
    answered, stray_sent = threading.Event(), threading.Event()

    def handler(server: RawServer, conn: socket.socket, reader: Reader) -> None:
        first = server.connections == 1
        while (request := reader.request()) is not None:
            server.record(request)
            conn.sendall(OK)
            if first:
                first = False
                answered.wait(5)  # not in the same read as the answer
                conn.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 5\r\n\r\nstray")
                stray_sent.set()

    if tls:
        server = tls_server(serve, certificate, handler)
        conn = HttpConnection("127.0.0.1", server.port, tls=True, timeout=5,
                              context=ssl.create_default_context(cafile=str(certificate[0])))
    else:
        server = serve(handler)
        conn = connect(server)
    with conn:
        assert conn.request("/", (), b"1") == (200, b"")
        answered.set()
        assert stray_sent.wait(5)
        wait_readable(conn._sock)
        assert conn.request("/", (), b"2") == (200, b"")
        assert conn.request("/", (), b"3") == (200, b"")
    assert server.connections == 2
    assert [r[-1:] for r in server.requests] == [b"1", b"2", b"3"]  # each sent once


@pytest.mark.parametrize("how", ["together", "after"])
def test_bytes_after_an_answer_close_the_connection(serve: Callable[..., RawServer], how: str) -> None:
    # Bytes beyond the answer: read with it ("together") or arriving before the next request.
    def handler(server: RawServer, conn: socket.socket, reader: Reader) -> None:
        first = server.connections == 1
        while (request := reader.request()) is not None:
            server.record(request)
            if first and how == "together":
                conn.sendall(OK + b"HTTP/1.1 200 OK\r\n")
            else:
                conn.sendall(OK)
                if first:
                    conn.sendall(b"\r\n")  # junk, e.g. a stray line end
            first = False

    server = serve(handler)
    with connect(server) as conn:
        assert conn.post("/", (), b"1") == 200
        if conn._sock is not None:
            wait_readable(conn._sock)
        assert conn.post("/", (), b"2") == 200
    assert server.connections == 2 and len(server.requests) == 2


def test_tls_records_on_an_idle_connection_keep_it(
    serve: Callable[..., RawServer], certificate: tuple[Path, Path]
) -> None:
    # TLS 1.3 servers send session tickets after the handshake; some send such records (tickets,
    # key updates) after an answer. The socket is readable, but holds nothing for us: kept.
    server = tls_server(serve, certificate, answering(OK))
    conn = HttpConnection("127.0.0.1", server.port, tls=True, timeout=5,
                          context=ssl.create_default_context(cafile=str(certificate[0])))
    with conn:
        conn._deadline = time.monotonic() + 5
        sock = conn._connect()  # handshake only: the tickets arrive after it, unread
        assert isinstance(sock, ssl.SSLSocket) and sock.version() == "TLSv1.3"
        wait_readable(sock)
        assert conn.post("/", (), b"x") == 200
        assert conn._sock is sock
    assert server.connections == 1


def test_refused_connection_is_an_oserror() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        with HttpConnection("127.0.0.1", port, tls=False, timeout=2) as conn, \
                pytest.raises(ConnectionRefusedError):
            conn.post("/", (), b"x")


# -- TLS ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    x509 = pytest.importorskip("cryptography.x509", reason="the cryptography package makes the test cert")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                     x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def tls_server(serve: Callable[..., RawServer], certificate: tuple[Path, Path], handler: Handler) -> RawServer:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    return serve(handler, tls=context)


def test_tls_post_with_sni_keepalive_and_idle_reconnect(
    serve: Callable[..., RawServer], certificate: tuple[Path, Path]
) -> None:
    names: list[str | None] = []

    def handler(server: RawServer, conn: socket.socket, reader: Reader) -> None:
        for _ in range(2):  # two requests per connection, then an idle close
            if (request := reader.request()) is None:
                return
            server.record(request)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    context.sni_callback = lambda sock, name, ctx: names.append(name)  # type: ignore[assignment,func-returns-value]
    server = serve(handler, tls=context)
    client = ssl.create_default_context(cafile=str(certificate[0]))
    with HttpConnection("127.0.0.1", server.port, tls=True, timeout=5, server_hostname="localhost",
                        context=client) as conn:
        for _ in range(4):
            assert conn.post("/", {"ce-id": "1"}, b"{}") == 200
            time.sleep(0.05)
    assert len(server.requests) == 4 and server.connections == 2
    assert names == ["localhost", "localhost"]
    assert server.requests[0].startswith(b"POST / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % server.port)


def test_tls_verifies_the_certificate_by_default(
    serve: Callable[..., RawServer], certificate: tuple[Path, Path]
) -> None:
    server = tls_server(serve, certificate, answering(OK))
    with HttpConnection("127.0.0.1", server.port, tls=True, timeout=5) as conn:
        with pytest.raises(ssl.SSLCertVerificationError) as caught:
            conn.post("/", (), b"")
        assert isinstance(caught.value, OSError)  # so the channel retries it, not rejects
    client = ssl.create_default_context(cafile=str(certificate[0]))
    with HttpConnection("127.0.0.1", server.port, tls=True, timeout=5, server_hostname="wrong.example",
                        context=client) as conn, pytest.raises(ssl.SSLCertVerificationError):
        conn.post("/", (), b"")


# -- request(): the body kept; per-call timeout; abort() ---------------------------------------


def test_request_returns_the_body_however_it_is_framed(serve: Callable[..., RawServer]) -> None:
    big = bytes(range(256)) * 1200  # > one recv
    server = serve(answering(
        b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n{\"a\":1}",
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(big), big),
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 400 Bad Request\nContent-Length: 3\n\nbad",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=1\r\nabc\r\n10\r\n0123456789abcdef\r\n"
        b"0\r\nX-T: 1\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
    ))
    with connect(server) as conn:
        assert conn.request("/", (), b"") == (200, b'{"a":1}')
        assert conn.request("/", (), b"") == (200, big)
        assert conn.request("/", (), b"") == (400, b"bad")
        assert conn.request("/", (), b"") == (200, b"abc0123456789abcdef")
        assert conn.request("/", (), b"") == (204, b"")
        assert conn.post("/", (), b"") == 200  # post and request share the connection
        assert conn.request("/", (), b"") == (200, big)
    assert server.connections == 1 and len(server.requests) == 7


def test_request_body_arriving_in_pieces(serve: Callable[..., RawServer]) -> None:
    chunked = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel", b"lo\r", b"\n1A\r\n",
               b"x" * 20, b"y" * 6 + b"\r", b"\n0\r\n", b"\r\n"]
    sized = [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234", b"567", b"89"]
    until_close = [b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil", b" close"]

    def handler(server: RawServer, conn: socket.socket, reader: Reader) -> None:
        for parts in (chunked, sized, until_close):
            if (request := reader.request()) is None:
                return
            server.record(request)
            for part in parts:
                conn.sendall(part)
                time.sleep(0.02)

    server = serve(handler)
    with connect(server) as conn:
        assert conn.request("/", (), b"") == (200, b"hello" + b"x" * 20 + b"y" * 6)
        assert conn.request("/", (), b"") == (200, b"0123456789")
        assert conn.request("/", (), b"") == (200, b"until close")
        assert conn._sock is None
    assert server.connections == 1


def test_per_call_timeout(serve: Callable[..., RawServer]) -> None:
    def handler(server: RawServer, conn: socket.socket, reader: Reader) -> None:
        while (request := reader.request()) is not None:
            server.record(request)
            time.sleep(0.6)  # a long poll
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")

    server = serve(handler)
    with connect(server, timeout=0.3) as conn:
        assert conn.request("/", (), b"", timeout=3) == (200, b"{}")
        sock = conn._sock
        # Back to the 0.3 s default for a call without one: with the 3 s of the call before, the
        # answer (after 0.6 s) would arrive and nothing would be raised.
        with pytest.raises(TimeoutError):
            conn.request("/", (), b"")
        assert conn._sock is None
        assert conn.post("/", (), b"", timeout=3) == 200
        assert conn._sock is not sock


@pytest.mark.parametrize("tls", [False, True])
def test_abort_breaks_off_a_blocked_call_and_refuses_later_ones(
    serve: Callable[..., RawServer], certificate: tuple[Path, Path], tls: bool
) -> None:
    def silent(server: RawServer, conn: socket.socket, reader: Reader) -> None:
        while (request := reader.request()) is not None:
            server.record(request)  # and never answer

    if tls:
        server = tls_server(serve, certificate, silent)
        conn = HttpConnection("127.0.0.1", server.port, tls=True, timeout=30,
                              context=ssl.create_default_context(cafile=str(certificate[0])))
    else:
        server = serve(silent)
        conn = connect(server, timeout=30)
    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            outcome["result"] = conn.request("/", (), b"x")
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            outcome["error"] = exc

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while not server.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)  # blocked in recv
    began = time.monotonic()
    conn.abort()
    thread.join(2)
    assert not thread.is_alive() and time.monotonic() - began < 1
    assert isinstance(outcome.get("error"), wire.Aborted), outcome  # not resent as a stale connection
    for _ in range(2):  # refused at once: the silent server would otherwise hold it 30 s
        with pytest.raises(wire.Aborted):
            conn.post("/", (), b"x")
    conn.close()
    assert server.connections == 1 and len(server.requests) == 1


def test_abort_before_any_call_never_connects(serve: Callable[..., RawServer]) -> None:
    server = serve(answering(OK))
    conn = connect(server)
    conn.abort()
    with pytest.raises(wire.Aborted):
        conn.request("/", (), b"")
    assert isinstance(wire.Aborted(), OSError)  # the channel treats it as a transport failure
    time.sleep(0.1)
    assert server.connections == 0
