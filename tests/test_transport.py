"""channels/transport/http.py (``HttpPool``, ``RequestTemplate``, ``encode_headers``) on real event
loops (asyncio's and uvloop, which production runs) against real servers on 127.0.0.1: the
DumperServer, and tiny raw-socket servers in threads for the edges (framing, 1xx, garbage, stray
answers, idle closes, trickling and silent servers, TLS with a self-signed certificate). No mocks.

Waits are on conditions (``until``), never on a guessed sleep; the only durations that matter are
deadlines, and each such test is arranged so that the outcome (the error type, the connection
closed) proves the deadline without timing it.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import io
import ipaddress
import socket
import ssl
import struct
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TypeVar, cast

import pytest
import uvloop

from channels.base import Message, Outcome
from poller.kit.dumper import DumperServer
from channels.events import EventFormat
from channels.http import HttpConfig
from channels.transport.http import (
    Aborted,
    HttpPool,
    PoolState,
    ProtocolError,
    RequestTemplate,
    encode_headers,
)

SOURCE = "http://localhost:4566/000000000000/orders"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
T = TypeVar("T")


def make_message(i: int = 0, **message_attributes: Any) -> Message:
    return Message(id=f"m-{i}", body=f'{{"n": {i}}}', ack_id=f"h-{i}",
                   attributes={"SentTimestamp": "1700000000123"},
                   message_attributes=message_attributes)


# -- event loops -------------------------------------------------------------------------------


class Run(Protocol):
    def __call__(self, main: Coroutine[Any, Any, T]) -> T: ...


def _runner(kind: str) -> Run:
    def run(main: Coroutine[Any, Any, T]) -> T:
        factory = uvloop.new_event_loop if kind == "uvloop" else None
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(main)
    return run


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run:
    """Runs a test's coroutine on a new loop: each case on both loops."""
    return _runner(request.param)


@pytest.fixture
def run_uv() -> Run:
    """uvloop only, for cases about bytes on the wire rather than the loop (the parser's verdicts)."""
    return _runner("uvloop")


async def until(condition: Callable[[], object], what: str = "", timeout: float = 10.0) -> None:
    """Wait on the loop until ``condition()`` holds; an AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"still waiting for {what or condition}"
        await asyncio.sleep(0.005)


async def settle(awaitable: Awaitable[T], limit: float = 20.0) -> T:
    """The awaitable's outcome, with a safety net that cannot pass for the transport's own
    TimeoutError: a hang fails the test with an AssertionError."""
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({task}, timeout=limit)
    if not done:
        task.cancel()
        raise AssertionError(f"no outcome within {limit} s")
    return task.result()


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
        self.tls_versions: list[str | None] = []
        self._open: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self.stopped = threading.Event()
        self._lock = threading.Lock()
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
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
                    self.tls_versions.append(conn.version())  # type: ignore[attr-defined]
            self.handler(self, conn, Reader(conn))
        except OSError:
            pass
        finally:
            conn.close()

    def record(self, request: bytes) -> None:
        with self._lock:
            self.requests.append(request)

    def bodies(self) -> list[bytes]:
        with self._lock:
            return [r.partition(b"\r\n\r\n")[2] for r in self.requests]

    def close(self) -> None:
        self.stopped.set()
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


Serve = Callable[..., RawServer]


@pytest.fixture
def serve() -> Iterator[Serve]:
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


def until_closed(closed: threading.Event) -> Handler:
    """Reads requests and never answers; sets ``closed`` when the client closes the connection."""
    def handler(server: RawServer, conn: socket.socket, reader: Reader) -> None:
        try:
            while (request := reader.request()) is not None:
                server.record(request)
        finally:
            closed.set()
    return handler


# -- the client side ---------------------------------------------------------------------------


class Answer(NamedTuple):
    status: int
    retry_after: float
    body: bytes | None
    error: BaseException | None


class Answers:
    """A ``done`` callback that keeps what it was called with."""

    def __init__(self) -> None:
        self.items: list[Answer] = []

    def __call__(self, status: int, retry_after: float, body: bytes | None, error: BaseException | None) -> None:
        self.items.append(Answer(status, retry_after, body, error))

    async def wait(self, n: int = 1, timeout: float = 20.0) -> list[Answer]:
        await until(lambda: len(self.items) >= n, f"{n} answers (have {self.items})", timeout)
        return list(self.items)


def build(pool: HttpPool, body: bytes = b"", target: str = "/") -> bytes:
    return RequestTemplate(pool.authority, target).build(body)


async def ask(pool: HttpPool, body: bytes = b"", *, timeout: float = 5.0) -> tuple[int, bytes]:
    """``request``: (status, body), or the error raised."""
    return await settle(pool.request(build(pool, body), timeout=timeout))


async def post(pool: HttpPool, body: bytes = b"", *, timeout: float = 5.0) -> int:
    """``send`` without keeping the body, as the HTTP channel sends: the status, or the error."""
    answers = Answers()
    pool.send(build(pool, body), answers, timeout=timeout)
    (answer,) = await answers.wait()
    if answer.error is not None:
        raise answer.error
    assert answer.body is None  # not kept
    return answer.status


def inconsistencies(pool: HttpPool) -> list[str]:
    """Where the pool's indexes (idle connections, connects in flight) disagree with what a scan
    of its connections' states counts, or its queue holds a finished request."""
    state, found = pool.state(), []
    idle = [conn for conn in pool._connections if conn.state is not None and conn.state.name == "IDLE"]
    if set(pool._idle) != set(idle) or len(pool._idle) != state.idle:
        found.append(f"idle index {len(pool._idle)}, idle connections {state}")
    if pool._connecting != state.connecting:
        found.append(f"connecting index {pool._connecting}, {state}")
    if not pool.connections == state.open <= pool.limit:
        found.append(f"{pool.connections} connections, {state}, limit {pool.limit}")
    if any(request.finished for request in pool._waiting) or state.waiting != len(pool._waiting):
        found.append(f"a finished request in the queue, {state}")
    return found


class _CheckedPool:
    """The pool, with its state checked at every ``done`` callback (state changes come before
    callbacks). A wrapper, not a patched ``send``: the compiled pool's methods cannot be replaced."""

    def __init__(self, pool: HttpPool, seen: list[str]) -> None:
        self._pool = pool
        self._seen = seen

    def send(self, data: bytes, done: Any, **options: Any) -> None:
        def checked(*answer: Any) -> None:
            self._seen.extend(inconsistencies(self._pool))  # not raised: it would break the loop's callback
            done(*answer)
        self._pool.send(data, checked, **options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


@asynccontextmanager
async def pool_for(port: int, **kwargs: Any) -> AsyncIterator[HttpPool]:
    """A pool to 127.0.0.1:``port``; aborted at the end, its connections seen closed.

    Its state is checked at every ``done`` callback (state changes come before callbacks) and at
    the end: the indexes must agree with the connections' states in every scenario."""
    pool = HttpPool("127.0.0.1", port, **kwargs)
    seen: list[str] = []
    try:
        yield cast(HttpPool, _CheckedPool(pool, seen))
        seen.extend(inconsistencies(pool))
    finally:
        pool.abort()
        await until(lambda: not pool._connections, "the pool's connections to close")
    assert seen == [] and pool.state() == PoolState(connecting=0, idle=0, active=0, closing=0, waiting=0)


def discarded(pool: HttpPool) -> Callable[[], bool]:
    """The pool holds no connection any more (the one it had was closed)."""
    return lambda: pool.connections == 0


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


def server_context(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    return context


def client_context(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certificate[0]))


def start(serve: Serve, handler: Handler, certificate: tuple[Path, Path] | None) -> tuple[RawServer, dict[str, Any]]:
    """A server, over TLS if ``certificate``; and the pool arguments to reach it."""
    if certificate is None:
        return serve(handler), {}
    return serve(handler, tls=server_context(certificate)), {"tls": True, "ssl_context": client_context(certificate)}


@pytest.fixture(params=["plain", "tls"])
def tls(request: pytest.FixtureRequest, certificate: tuple[Path, Path]) -> tuple[Path, Path] | None:
    """None for plain TCP, else the certificate to serve (and trust) over TLS."""
    return certificate if request.param == "tls" else None


# -- request building --------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [
    {"ce-id": "a\r\nX-Injected: 1"}, {"ce-id": "a\nb"}, {"ce-id": "a\rb"}, {"ce-id": "a\0b"},
    [("ce id", "v")], [("", "v")], [("ce-id:", "v")], [(" folded", "v")], [("ce-id\r\nX", "v")],
    {"ce-id": "\u2615"},  # not latin-1
    [("ok", "fine"), ("ce-id", "a\r\nb")],  # the bad one need not be the first
])
def test_invalid_headers_raise_valueerror(headers: Any) -> None:
    with pytest.raises(ValueError):
        encode_headers(headers)
    with pytest.raises(ValueError):
        RequestTemplate("h", "/", headers)


@pytest.mark.parametrize("target", ["", "/a b", "/a\r\nX: 1", "/a\nb", "/\0", "/caf\u00e9", "/a\tb"])
def test_invalid_request_targets_raise_valueerror(target: str) -> None:
    with pytest.raises(ValueError):
        RequestTemplate("h", target)


def test_request_is_one_well_formed_message(run: Run, serve: Serve) -> None:
    server = serve(answering(OK))

    async def main() -> None:
        async with pool_for(server.port) as pool:
            template = RequestTemplate(pool.authority, "/p?q=1", [("User-Agent", "u")])
            own = encode_headers({"Content-Type": "text/plain", "ce-x": "caf\u00e9"})
            assert await settle(pool.request(template.build(b"body", own), timeout=5)) == (200, b"")
            with pytest.raises(ValueError):  # refused before anything is sent
                template.build(b"never", encode_headers({"ce-x": "a\r\nb"}))
            assert await settle(pool.request(template.build(b""), timeout=5)) == (200, b"")
            assert pool.authority == f"127.0.0.1:{server.port}"

    run(main())
    assert server.requests == [
        b"POST /p?q=1 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAccept-Encoding: identity\r\nUser-Agent: u\r\n"
        b"Content-Type: text/plain\r\nce-x: caf\xe9\r\nContent-Length: 4\r\n\r\nbody" % server.port,
        b"POST /p?q=1 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAccept-Encoding: identity\r\nUser-Agent: u\r\n"
        b"Content-Length: 0\r\n\r\n" % server.port,
    ]
    assert server.connections == 1


def test_host_header_leaves_out_the_default_port() -> None:
    assert HttpPool("example.com", 80).authority == "example.com"
    assert HttpPool("example.com", 443, tls=True).authority == "example.com"
    assert HttpPool("example.com", 443).authority == "example.com:443"
    assert HttpPool("::1", 8080).authority == "[::1]:8080"


# -- against the DumperServer ------------------------------------------------------------------


def test_binary_events_reach_the_dumper_over_one_keepalive_connection(run: Run) -> None:
    fmt = EventFormat(SOURCE)
    with DumperServer(out=io.StringIO(), keep=True) as dumper:
        async def main() -> None:
            async with pool_for(dumper.port) as pool:
                template = RequestTemplate(pool.authority, "/", {"User-Agent": "t", **fmt.http_binary_constant()})
                for i in range(20):
                    head, body = fmt.http_binary_head(make_message(i))  # as the channel builds them
                    assert await settle(pool.request(template.build(body, head), timeout=5)) == (200, b"")
                connections = set(pool._connections)
                other = RequestTemplate(pool.authority, "/x?y=1", {"User-Agent": "t", **fmt.http_binary_constant()})
                headers, body = fmt.http_binary_message(make_message(20))  # the checked encoder
                assert await post(pool, b"") == 400  # not a CloudEvent; its body is drained
                assert await settle(pool.request(other.build(body, encode_headers(headers)), timeout=5)) == (200, b"")
                assert set(pool._connections) == connections  # the same connection all along

        run(main())
        assert dumper.counts.accepted == 21
        got = dumper.received[3]
        expected, body = fmt.http_binary(make_message(3))
        assert got.body == body
        assert {k.lower(): v for k, v in expected.items()}.items() <= dict(got.headers).items()
        assert got.headers["host"] == f"127.0.0.1:{dumper.port}"
        assert got.headers["user-agent"] == "t"
        assert [e["id"] for e in dumper.events] == [f"m-{i}" for i in range(21)]


def test_error_statuses_are_returned_and_the_connection_kept(run: Run) -> None:
    answers = {"bad": 400, "busy": 503, "gone": 410}
    fmt = EventFormat(SOURCE)
    with DumperServer(out=io.StringIO(), respond=lambda event, headers: answers.get(event["id"])) as dumper:
        async def main() -> None:
            async with pool_for(dumper.port) as pool:
                template = RequestTemplate(pool.authority, "/", fmt.http_binary_constant())
                for event_id, status in [("bad", 400), ("ok", 200), ("busy", 503), ("gone", 410), ("ok", 200)]:
                    head, body = fmt.http_binary_head(Message(id=event_id, body="{}", ack_id="h"))
                    done = Answers()
                    pool.send(template.build(body, head), done, timeout=5)
                    assert [a.status for a in await done.wait()] == [status]
                assert pool.connections == 1

        run(main())


# -- answer framing ----------------------------------------------------------------------------


def test_chunked_answer_with_extensions_and_trailers_in_pieces(run: Run, serve: Serve) -> None:
    def handler(server: RawServer, conn: socket.socket, reader: Reader) -> None:
        while (request := reader.request()) is not None:
            server.record(request)
            for part in (b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\n",
                         b"5;ext=1\r\nhello\r\n", b"1A\r\n" + b"x" * 26 + b"\r\n",
                         b"0\r\nX-Trailer: 1\r\nX-Other: 2\r\n", b"\r\n"):
                conn.sendall(part)
                time.sleep(0.01)  # so that they arrive in pieces

    server = serve(handler)

    async def main() -> None:
        async with pool_for(server.port) as pool:
            assert [await post(pool, b"%d" % i) for i in range(2)] == [202, 202]
            assert await ask(pool) == (202, b"hello" + b"x" * 26)

    run(main())
    assert server.connections == 1 and len(server.requests) == 3


def test_chunked_answer_in_one_piece(run_uv: Run, serve: Serve) -> None:
    server = serve(answering(b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n"
                             b"3\r\nabc\r\n0\r\n\r\n"))

    async def main() -> None:
        async with pool_for(server.port) as pool:
            assert [await ask(pool) for _ in range(3)] == [(200, b"abc")] * 3

    run_uv(main())
    assert server.connections == 1


def test_bodies_are_read_to_their_end_before_the_next_request(run: Run, serve: Serve) -> None:
    big = b"y" * 300_000
    server = serve(answering(
        b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n\r\nbad request",
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(big), big),
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",  # no body, whatever the length says
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    ))

    async def main() -> None:
        async with pool_for(server.port) as pool:
            assert [await post(pool) for _ in range(6)] == [400, 200, 204, 304, 200, 400]

    run(main())
    assert server.connections == 1


@pytest.mark.parametrize(("response", "connections"), [
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", 3),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", 3),
    (b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n", 1),
    (b"HTTP/1.1 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 0\r\n\r\n", 3),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 1),
], ids=["close", "http10", "http10-keepalive", "keepalive-close", "http11"])
def test_connection_close_and_http10(run: Run, serve: Serve, response: bytes, connections: int) -> None:
    # The server keeps the connection open whatever it answered: only the answer may tell the
    # client not to reuse it.
    server = serve(answering(response))

    async def main() -> None:
        async with pool_for(server.port) as pool:
            assert [await post(pool) for _ in range(3)] == [200, 200, 200]
            if connections > 1:
                await until(discarded(pool), "the connection closed after a close answer")
            else:
                assert pool.connections == 1

    run(main())
    assert server.connections == connections and len(server.requests) == 3


def test_a_body_until_close(run: Run, serve: Serve) -> None:
    server = serve(answering(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nbody until close", then_close=True))

    async def main() -> None:
        async with pool_for(server.port) as pool:
            assert await ask(pool) == (200, b"body until close")
            assert await post(pool) == 200
            assert await ask(pool) == (200, b"body until close")

    run(main())
    assert server.connections == 3


def test_interim_1xx_answers_are_skipped(run: Run, serve: Serve) -> None:
    def handler(server: RawServer, conn: socket.socket, reader: Reader) -> None:
        while (request := reader.request()) is not None:
            server.record(request)
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            time.sleep(0.01)  # the final answer in a later read
            conn.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                         b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nhi")

    server = serve(handler)

    async def main() -> None:
        async with pool_for(server.port) as pool:
            assert await post(pool, b"x") == 201
            assert await ask(pool, b"x") == (201, b"hi")
            assert pool.connections == 1

    run(main())
    assert server.connections == 1


def test_the_body_is_returned_however_it_is_framed(run: Run, serve: Serve) -> None:
    big = bytes(range(256)) * 1200  # more than one read
    server = serve(answering(
        b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n{\"a\":1}",
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(big), big),
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 400 Bad Request\r\nContent-Length: 3\r\n\r\nbad",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=1\r\nabc\r\n10\r\n0123456789abcdef\r\n"
        b"0\r\nX-T: 1\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
    ))

    async def main() -> None:
        async with pool_for(server.port) as pool:
            assert await ask(pool) == (200, b'{"a":1}')
            assert await ask(pool) == (200, big)
            assert await ask(pool) == (400, b"bad")
            assert await ask(pool) == (200, b"abc0123456789abcdef")
            assert await ask(pool) == (204, b"")
            assert await post(pool) == 200  # with and without the body, on the same connection
            assert await ask(pool) == (200, big)

    run(main())
    assert server.connections == 1 and len(server.requests) == 7


def test_the_body_arriving_in_pieces(run: Run, serve: Serve) -> None:
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
                time.sleep(0.02)  # so that they arrive in pieces

    server = serve(handler)

    async def main() -> None:
        async with pool_for(server.port) as pool:
            assert await ask(pool) == (200, b"hello" + b"x" * 20 + b"y" * 6)
            assert await ask(pool) == (200, b"0123456789")
            assert await ask(pool) == (200, b"until close")
            await until(discarded(pool))

    run(main())
    assert server.connections == 1


def test_bare_lf_line_ends_are_a_protocol_error(run_uv: Run, serve: Serve) -> None:
    # llhttp is strict (RFC 9112 2.2 lets a client accept a bare LF; it need not): such an answer
    # is refused, not misread.
    server = serve(answering(b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok"))

    async def main() -> None:
        async with pool_for(server.port) as pool:
            with pytest.raises(ProtocolError):
                await ask(pool)

    run_uv(main())


# -- what cannot be framed ---------------------------------------------------------------------

# (answer, parsed): ``parsed``: the parser itself must refuse it, with the connection still open;
# otherwise (an answer cut short, a head that never ends) it is the server's close that tells.
GARBAGE = [
    (b"SPAM\r\n\r\n", True),
    (b"HTTP/2 200\r\n\r\n", True),
    (b"HTTP/1.1 2000 OK\r\n\r\n", True),
    (b"HTTP/1.1 abc OK\r\n\r\n", True),
    (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", True),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", True),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", True),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n", True),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcdef\r\n0\r\n\r\n", True),  # data > size
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", True),
    (b"HTTP/1.1 100 Continue\r\n\r\n" * 40, True),  # more interim answers than MAX_INTERIM
    # Both framings (RFC 9112 6.3): a smuggling sign, whichever the server meant.
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", True),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n0\r\n\r\n", True),
    (b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n", True),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: gzip\r\n\r\nok", True),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", False),  # truncated body
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", False),  # truncated chunk
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1;" + b"e" * 70_000 + b"\r\n", False),
    (b"HTTP/1.1 200 OK\r\nContent-", False),  # a head cut short
]


@pytest.mark.parametrize(("garbage", "parsed"), GARBAGE, ids=[f"{i}-{g[:24]!r}" for i, (g, _) in enumerate(GARBAGE)])
def test_garbage_is_a_protocol_error_and_the_next_request_uses_a_fresh_connection(
    run_uv: Run, serve: Serve, garbage: bytes, parsed: bool
) -> None:
    def handler(server: RawServer, conn: socket.socket, reader: Reader) -> None:
        first = server.connections == 1
        while (request := reader.request()) is not None:
            server.record(request)
            if not first:
                conn.sendall(OK)
                continue
            conn.sendall(garbage)
            if not parsed:
                return  # the close is what ends the answer

    server = serve(handler)

    async def main() -> None:
        async with pool_for(server.port) as pool:
            with pytest.raises(ProtocolError):
                await post(pool, b"x")
            await until(discarded(pool), "the connection closed after the garbage")
            assert await post(pool, b"x") == 200

    run_uv(main())
    assert server.connections == 2 and len(server.requests) == 2


# -- stray answers -----------------------------------------------------------------------------


def test_a_stray_answer_on_an_idle_connection_is_never_taken_for_the_next_one(
    run: Run, serve: Serve, tls: tuple[Path, Path] | None
) -> None:
    # A server answers, then sends a second answer nobody asked for. Read as the answer to the
    # next request, its 500 would stand for a request the server never answered (or a 200 for
    # one it refused): the idle connection is discarded and the next request sent on a new one.
    answered = threading.Event()

    def handler(server: RawServer, conn: socket.socket, reader: Reader) -> None:
        first = server.connections == 1
        while (request := reader.request()) is not None:
            server.record(request)
            conn.sendall(OK)
            if first:
                first = False
                answered.wait(5)  # not in the same read as the answer
                conn.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 5\r\n\r\nstray")

    server, options = start(serve, handler, tls)

    async def main() -> None:
        async with pool_for(server.port, **options) as pool:
            assert await ask(pool, b"1") == (200, b"")
            answered.set()
            await until(discarded(pool), "the stray answer to close the idle connection")
            assert await ask(pool, b"2") == (200, b"")
            assert await ask(pool, b"3") == (200, b"")

    run(main())
    assert server.connections == 2
    assert server.bodies() == [b"1", b"2", b"3"]  # each sent once


def test_a_stray_answer_in_the_same_read_is_not_taken_for_this_one(run: Run, serve: Serve) -> None:
    # The answer and an unasked one arrive together: the request gets its own answer (status,
    # body, Retry-After), not the stray's, and the connection is not reused.
    def handler(server: RawServer, conn: socket.socket, reader: Reader) -> None:
        first = server.connections == 1
        while (request := reader.request()) is not None:
            server.record(request)
            answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
            if first:
                answer += b"HTTP/1.1 503 Unavailable\r\nRetry-After: 60\r\nContent-Length: 5\r\n\r\nstray"
            first = False
            conn.sendall(answer)

    server = serve(handler)

    async def main() -> None:
        async with pool_for(server.port) as pool:
            done = Answers()
            pool.send(build(pool, b"1"), done, timeout=5, keep_body=True)
            assert await done.wait() == [Answer(200, 0.0, b"ok", None)]
            await until(discarded(pool))
            assert await ask(pool, b"2") == (200, b"ok")

    run(main())
    assert server.connections == 2 and server.bodies() == [b"1", b"2"]


@pytest.mark.parametrize("how", ["together", "after"])
def test_bytes_after_an_answer_close_the_connection(run: Run, serve: Serve, how: str) -> None:
    # Bytes beyond the answer: read with it ("together") or arriving while it is idle ("after").
    def handler(server: RawServer, conn: socket.socket, reader: Reader) -> None:
        first = server.connections == 1
        while (request := reader.request()) is not None:
            server.record(request)
            if first and how == "together":
                conn.sendall(OK + b"HTTP/1.1 200 OK\r\n")
            else:
                conn.sendall(OK)
                if first:
                    time.sleep(0.01)
                    conn.sendall(b"junk\r\n")
            first = False

    server = serve(handler)

    async def main() -> None:
        async with pool_for(server.port) as pool:
            assert await post(pool, b"1") == 200
            await until(discarded(pool))
            assert await post(pool, b"2") == 200

    run(main())
    assert server.connections == 2 and len(server.requests) == 2


def test_tls_records_on_an_idle_connection_keep_it(run: Run, serve: Serve, certificate: tuple[Path, Path]) -> None:
    # TLS 1.3 servers send session tickets after the handshake (and may send key updates later):
    # records with nothing for us, which only the TLS layer sees; the connection stays reusable.
    server, options = start(serve, answering(OK), certificate)

    async def main() -> None:
        async with pool_for(server.port, **options) as pool:
            assert [await post(pool, b"%d" % i) for i in range(3)] == [200, 200, 200]
            assert pool.connections == 1

    run(main())
    assert server.connections == 1 and server.tls_versions == ["TLSv1.3"]


# -- closed connections ------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["close", "reset"])
def test_an_idle_connection_closed_by_the_server_is_replaced(run: Run, serve: Serve, how: str) -> None:
    def handler(server: RawServer, conn: socket.socket, reader: Reader) -> None:
        if (request := reader.request()) is None:
            return
        server.record(request)
        conn.sendall(OK)  # keep-alive, but then the server drops the idle connection
        if how == "reset":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST

    server = serve(handler)

    async def main() -> None:
        async with pool_for(server.port) as pool:
            for i in range(3):
                assert await post(pool, b"%d" % i) == 200
                await until(discarded(pool), "the server's close to reach the idle connection")

    run(main())
    assert server.connections == 3 and server.bodies() == [b"0", b"1", b"2"]


@pytest.mark.parametrize("how", ["close", "reset"])
def test_a_reused_connection_closed_as_the_request_arrives_is_retried_once(
    run: Run, serve: Serve, how: str
) -> None:
    # The race an idle close loses: the server closes the kept-alive connection just as the next
    # request is on its way. Reading the request and closing without a byte of answer makes that
    # race certain; the request goes again on a new connection and succeeds.
    def handler(server: RawServer, conn: socket.socket, reader: Reader) -> None:
        first = server.connections == 1
        while (request := reader.request()) is not None:
            server.record(request)
            if first and len(server.requests) > 1:
                if how == "reset":
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            conn.sendall(OK)

    server = serve(handler)

    async def main() -> None:
        async with pool_for(server.port) as pool:
            assert await post(pool, b"x") == 200
            assert await post(pool, b"y") == 200
            assert await post(pool, b"z") == 200

    run(main())
    assert server.connections == 2
    assert server.bodies() == [b"x", b"y", b"y", b"z"]


def test_a_fresh_connection_closed_without_an_answer_is_not_resent(run: Run, serve: Serve) -> None:
    def handler(server: RawServer, conn: socket.socket, reader: Reader) -> None:
        if (request := reader.request()) is not None:
            server.record(request)  # and close without answering

    server = serve(handler)

    async def main() -> None:
        async with pool_for(server.port) as pool:
            with pytest.raises(ConnectionResetError):
                await post(pool, b"x")

    run(main())
    assert server.connections == 1 and len(server.requests) == 1


def test_a_reused_connection_is_resent_only_once(run: Run, serve: Serve) -> None:
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

    async def main() -> None:
        async with pool_for(server.port) as pool:
            assert await post(pool, b"x") == 200
            with pytest.raises(ConnectionResetError):
                await post(pool, b"y")  # no answer on the reused connection, nor on the new one

    run(main())
    assert server.connections == 2
    assert server.bodies() == [b"x", b"y", b"y"]


# -- keep-alive expiry -------------------------------------------------------------------------


def per_connection(answer: bytes, idle_timeout: float | None = None) -> tuple[Handler, list[list[bytes]], list[int]]:
    """Answers every request with ``answer``; keeps the bodies each connection carried, in the
    order of the connections, and which connections the client closed (EOF while idle).
    ``idle_timeout``: the server closes a connection idle that long, as a keep-alive server does."""
    carried: list[list[bytes]] = []
    closed_by_client: list[int] = []

    def handler(server: RawServer, conn: socket.socket, reader: Reader) -> None:
        bodies: list[bytes] = []
        carried.append(bodies)
        number = len(carried) - 1
        if idle_timeout is not None:
            conn.settimeout(idle_timeout)  # the Reader's recv times out: the server closes it
        while (request := reader.request()) is not None:
            server.record(request)
            bodies.append(request.partition(b"\r\n\r\n")[2])
            conn.sendall(answer)
        closed_by_client.append(number)

    return handler, carried, closed_by_client


def test_an_idle_connection_past_its_expiry_is_closed_not_reused(run: Run, serve: Serve) -> None:
    # The server keeps idle connections for ever (as nginx's 75 s, seen from a short test): the
    # client closes one that idled past its keepalive_expiry and writes the next request on a new
    # one. The sleep is the idle time under test.
    handler, carried, closed_by_client = per_connection(OK)
    server = serve(handler)

    async def main() -> None:
        async with pool_for(server.port, keepalive_expiry=0.3) as pool:
            assert await post(pool, b"1") == 200
            assert await post(pool, b"2") == 200  # idle for less than 0.3 s: the same connection
            await asyncio.sleep(0.5)
            assert await post(pool, b"3") == 200
            await until(lambda: closed_by_client == [0], "the expired connection to be closed")
            assert pool.state() == PoolState(connecting=0, idle=1, active=0, closing=0, waiting=0)

    run(main())
    assert server.connections == 2 and carried == [[b"1", b"2"], [b"3"]]


def test_no_keepalive_expiry_means_no_reuse_after_an_answer(run: Run, serve: Serve) -> None:
    handler, carried, _ = per_connection(OK)
    server = serve(handler)

    async def main() -> None:
        async with pool_for(server.port, keepalive_expiry=0) as pool:
            for body in (b"1", b"2"):
                assert await post(pool, body) == 200

    run(main())
    assert carried == [[b"1"], [b"2"]]


def test_the_default_keepalive_expiry_is_below_common_servers_idle_timeouts() -> None:
    assert HttpPool("127.0.0.1", 80)._keepalive_expiry < 2  # gunicorn's --keep-alive: 2 s
    with pytest.raises(ValueError):
        HttpPool("127.0.0.1", 80, keepalive_expiry=-1)


@pytest.mark.parametrize(("keep_alive", "carried"), [
    (b"timeout=1", [[b"1"], [b"2"]]),  # the server closes it after 1 s idle: we after 0.5 s
    (b"max=100, timeout=1", [[b"1"], [b"2"]]),
    (b"timeout=5, max=100", [[b"1", b"2"]]),  # 4 s for us: reused after 0.7 s
    (b"timeout=soon", [[b"1", b"2"]]),  # not a number: the pool's own expiry (10 s) stands
    (b"timeout=0", [[b"1"], [b"2"]]),  # closed at once: never idle
])
def test_a_keep_alive_timeout_header_is_honoured(
    run: Run, serve: Serve, keep_alive: bytes, carried: list[list[bytes]]
) -> None:
    # The server closes a connection idle for the timeout it announces (as Apache does, with
    # "Keep-Alive: timeout=5, max=100"); the client must not write a request on it in the last
    # moments, however long its own keepalive_expiry. 0.7 s idle: past our limit for timeout=1
    # (0.5 s), before the server's close (1 s).
    handler, seen, _ = per_connection(
        b"HTTP/1.1 200 OK\r\nKeep-Alive: " + keep_alive + b"\r\nContent-Length: 0\r\n\r\n", idle_timeout=1.0)
    server = serve(handler)

    async def main() -> None:
        async with pool_for(server.port, keepalive_expiry=10) as pool:
            assert await post(pool, b"1") == 200
            await asyncio.sleep(0.7)
            assert await post(pool, b"2") == 200

    run(main())
    assert seen == carried


def test_refused_connection_is_an_oserror(run: Run) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused

        async def main() -> None:
            async with pool_for(port, limit=1) as pool:
                with pytest.raises(ConnectionRefusedError):
                    await ask(pool)
                # Two at once on a one-connection pool: each gets its own attempt, none hangs.
                done = Answers()
                pool.send(build(pool), done, timeout=5)
                pool.send(build(pool), done, timeout=5)
                assert [type(a.error) for a in await done.wait(2)] == [ConnectionRefusedError] * 2
                assert pool.connections == 0

        run(main())


# -- deadlines ---------------------------------------------------------------------------------


def test_a_server_that_never_answers_times_out(run: Run, serve: Serve) -> None:
    closed = threading.Event()

    def handler(server: RawServer, conn: socket.socket, reader: Reader) -> None:
        if (request := reader.request()) is not None:
            server.record(request)
            conn.sendall(b"HTTP/1.1 200 OK\r\n")  # half a head, then silence
        reader.request()  # until the client closes
        closed.set()

    server = serve(handler)

    async def main() -> None:
        async with pool_for(server.port) as pool:
            with pytest.raises(TimeoutError):
                await post(pool, b"x", timeout=0.3)
            await until(discarded(pool))
            await until(closed.is_set, "the server to see the connection closed")

    run(main())
    assert len(server.requests) == 1


def trickling(response: bytes, closed: threading.Event, every: float = 0.06) -> Handler:
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
                closed.set()
                return
    return handler


TRICKLED = {  # each takes several seconds at one byte every 60 ms
    "head": b"HTTP/1.1 200 OK\r\nX-Slow: " + b"s" * 80 + b"\r\nContent-Length: 0\r\n\r\n",
    "body": b"HTTP/1.1 200 OK\r\nContent-Length: 80\r\n\r\n" + b"b" * 80,
    "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1\r\nc\r\n" * 20 + b"0\r\n\r\n",
}


@pytest.mark.parametrize("part", sorted(TRICKLED))
@pytest.mark.parametrize("keep_body", [False, True])
def test_the_deadline_bounds_the_whole_answer_not_each_read(
    run: Run, serve: Serve, part: str, keep_body: bool
) -> None:
    # Every byte comes well within the timeout, but the whole answer would take seconds: a
    # timeout per read never fires (the answer would end with a 200), a deadline for the request
    # does; the connection is closed under the trickle.
    closed = threading.Event()
    server = serve(trickling(TRICKLED[part], closed))

    async def main() -> None:
        async with pool_for(server.port) as pool:
            done = Answers()
            pool.send(build(pool, b"x"), done, timeout=0.5, keep_body=keep_body)
            (answer,) = await done.wait()
            assert answer.status == 0 and isinstance(answer.error, TimeoutError), answer
            await until(discarded(pool))
            await until(closed.is_set, "the server to see the connection closed")

    run(main())
    assert len(server.requests) == 1  # not resent


def test_each_request_has_its_own_deadline(run: Run, serve: Serve) -> None:
    release = threading.Event()

    def handler(server: RawServer, conn: socket.socket, reader: Reader) -> None:
        while (request := reader.request()) is not None:
            server.record(request)
            body = request.partition(b"\r\n\r\n")[2]
            if body == b"held":
                release.wait(10)
            elif body == b"never":
                continue
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")

    server = serve(handler)

    async def main() -> None:
        async with pool_for(server.port) as pool:
            assert await ask(pool, b"quick", timeout=0.3) == (200, b"{}")
            # A long poll on the same connection: the short deadline before is not its deadline.
            held = asyncio.ensure_future(ask(pool, b"held", timeout=10))
            await until(lambda: len(server.requests) == 2)
            await asyncio.sleep(0.6)  # past the deadline of the request before
            assert not held.done()
            release.set()
            assert await held == (200, b"{}")
            assert pool.connections == 1
            with pytest.raises(TimeoutError):
                await ask(pool, b"never", timeout=0.3)
            await until(discarded(pool))
            assert await ask(pool, b"after", timeout=5) == (200, b"{}")  # a new connection

    run(main())
    assert server.connections == 2


def test_a_deadline_covers_the_connect(run: Run, serve: Serve) -> None:
    # A TLS handshake the server never answers: the request's deadline ends the wait, however
    # long the pool's connect timeout.
    closed = threading.Event()
    server = serve(until_closed(closed))  # plain TCP: no ServerHello ever comes

    async def main() -> None:
        async with pool_for(server.port, tls=True, connect_timeout=30) as pool:
            with pytest.raises(TimeoutError, match="request's deadline"):  # not the connect timeout
                await ask(pool, timeout=0.3)

    run(main())
    assert server.requests == []


# -- the pool ----------------------------------------------------------------------------------


def held_until(release: threading.Event) -> Handler:
    """Answers each request once ``release`` is set."""
    def handler(server: RawServer, conn: socket.socket, reader: Reader) -> None:
        while (request := reader.request()) is not None:
            server.record(request)
            release.wait(10)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    return handler


def test_the_pool_limit_is_respected_and_the_rest_wait_their_turn(run: Run, serve: Serve) -> None:
    release = threading.Event()
    server = serve(held_until(release))

    async def main() -> None:
        async with pool_for(server.port, limit=2) as pool:
            done = Answers()
            for i in range(6):
                pool.send(build(pool, b"%d" % i), done, timeout=10, keep_body=True)
            await until(lambda: len(server.requests) == 2, "two requests on two connections")
            assert pool.connections == 2 and done.items == []
            assert pool.state() == PoolState(connecting=0, idle=0, active=2, closing=0, waiting=4)
            release.set()
            answers = await done.wait(6)
            assert [(a.status, a.body, a.error) for a in answers] == [(200, b"ok", None)] * 6
            assert pool.connections == 2
            assert pool.state() == PoolState(connecting=0, idle=2, active=0, closing=0, waiting=0)

    run(main())
    assert server.connections == 2
    assert sorted(server.bodies()) == [b"%d" % i for i in range(6)]


@pytest.mark.parametrize("how", ["close-answer", "server-close", "garbage", "timeout"])
def test_requests_waiting_for_a_connection_get_one_when_a_connection_closes(
    run: Run, serve: Serve, how: str
) -> None:
    # A one-connection pool, three requests at once: the connection each one ends on is closed
    # (the answer says so, the server closes it, garbage, a deadline), and the next one waiting
    # must get a new connection, not wait for one that no longer exists.
    def handler(server: RawServer, conn: socket.socket, reader: Reader) -> None:
        if (request := reader.request()) is None:
            return
        server.record(request)
        if request.endswith(b"bad") and how in ("garbage", "timeout"):
            if how == "garbage":
                conn.sendall(b"SPAM\r\n\r\n")
            reader.request()  # held open (and the timeout's never answered): the client closes it
            return
        conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
                     if how == "close-answer" else OK)
        if how != "server-close":
            reader.request()  # held open: the client must close it

    server = serve(handler)
    errors = {"close-answer": None, "server-close": None, "garbage": ProtocolError, "timeout": TimeoutError}

    async def main() -> None:
        async with pool_for(server.port, limit=1) as pool:
            done = Answers()
            for body in (b"bad", b"1", b"2"):
                pool.send(build(pool, body), done, timeout=0.5 if body == b"bad" else 10)
            first, *rest = await done.wait(3)
            error = errors[how]
            assert type(first.error) is error if error else first.status == 200
            assert [(a.status, a.error) for a in rest] == [(200, None)] * 2
            assert pool.connections <= 1

    run(main())
    assert server.connections == 3 and sorted(server.bodies()) == [b"1", b"2", b"bad"]


def test_waiting_for_a_free_connection_counts_and_an_expired_request_is_never_sent(run: Run, serve: Serve) -> None:
    """The deadline starts at send: a request that waited its whole deadline behind a slow one
    fails, and is not written later, when its caller has long given up on it (a congested pool
    sent such stale requests, and their messages were received and queued again)."""
    release = threading.Event()
    server = serve(held_until(release))

    async def main() -> None:
        async with pool_for(server.port, limit=1) as pool:
            done = Answers()
            pool.send(build(pool, b"first"), done, timeout=10)
            pool.send(build(pool, b"second"), done, timeout=0.5)  # waits behind the first
            pool.send(build(pool, b"third"), done, timeout=10)
            await until(lambda: len(server.requests) == 1)
            [late] = await done.wait(1)
            assert isinstance(late.error, TimeoutError) and "no connection" in str(late.error)
            release.set()
            answers = await done.wait(3)
            assert [(a.status, a.error) for a in answers[1:]] == [(200, None)] * 2

    run(main())
    assert server.connections == 1 and server.bodies() == [b"first", b"third"]


def test_a_kept_body_past_max_body_is_dropped_and_its_connection_closed(run: Run, serve: Serve) -> None:
    """A 2xx answer with an endless body: the status stands, the body is not kept (None), and the
    connection is not read to its end (a 300 MiB answer had grown a worker to 940 MiB)."""
    big = b"x" * 200_000
    server = serve(answering(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(big), big),
                             OK, OK))

    async def main() -> None:
        async with pool_for(server.port) as pool:
            done = Answers()
            pool.send(build(pool), done, timeout=5, keep_body=True, max_body=1000)
            [answer] = await done.wait(1)
            assert (answer.status, answer.body, answer.error) == (200, None, None)
            with pytest.raises(ProtocolError, match="longer than 10 bytes"):
                await settle(pool.request(build(pool), timeout=5, max_body=10))

    run(main())
    assert server.connections >= 2  # the first connection was closed, not reused


def test_done_is_called_once_from_the_loop_never_from_within_send(run: Run, serve: Serve) -> None:
    server = serve(answering(OK))

    async def main() -> None:
        async with pool_for(server.port) as pool:
            calls: list[bool] = []
            in_send = False

            def done(status: int, retry_after: float, body: bytes | None, error: BaseException | None) -> None:
                calls.append(in_send)

            for _ in range(2):  # a new connection, then an idle one
                in_send = True
                pool.send(build(pool), done, timeout=5)
                in_send = False
                await until(lambda: calls)
                assert calls == [False]
                calls.clear()
            pool.abort()
            in_send = True
            pool.send(build(pool), done, timeout=5)  # refused: still from the loop
            in_send = False
            await until(lambda: calls)
            assert calls == [False]

    run(main())


def test_retry_after_reaches_done(run: Run, serve: Serve) -> None:
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=120)
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=120)
    values = [b"7", email.utils.format_datetime(soon, usegmt=True).encode(), b"86400",
              email.utils.format_datetime(past, usegmt=True).encode(), b"soon", b"-3", None]
    server = serve(answering(*[
        b"HTTP/1.1 503 Service Unavailable\r\n"
        + (b"Retry-After: %s\r\n" % value if value is not None else b"") + b"Content-Length: 0\r\n\r\n"
        for value in values
    ]))

    async def main() -> None:
        async with pool_for(server.port) as pool:
            seen = []
            for _ in values:
                done = Answers()
                pool.send(build(pool), done, timeout=5)
                (answer,) = await done.wait()
                assert answer.status == 503 and answer.error is None
                seen.append(answer.retry_after)
            seconds, date, capped, *rest = seen
            assert seconds == 7.0
            assert 60 < date <= 120  # an HTTP-date: seconds from now
            assert capped == 3600.0
            assert rest == [0.0, 0.0, 0.0, 0.0]  # past, unreadable, negative, none

    run(main())


def test_keep_body(run: Run, serve: Serve) -> None:
    server = serve(answering(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbody"))

    async def main() -> None:
        async with pool_for(server.port) as pool:
            done = Answers()
            pool.send(build(pool), done, timeout=5)
            await done.wait(1)
            pool.send(build(pool), done, timeout=5, keep_body=True)
            assert [a.body for a in await done.wait(2)] == [None, b"body"]
            assert await settle(pool.request(build(pool), timeout=5)) == (200, b"body")
            assert await settle(pool.request(build(pool), timeout=5, keep_body=False)) == (200, b"")

    run(main())
    assert server.connections == 1


# -- TLS ---------------------------------------------------------------------------------------


def test_tls_with_sni_keepalive_and_idle_reconnect(run: Run, serve: Serve, certificate: tuple[Path, Path]) -> None:
    names: list[str | None] = []

    def handler(server: RawServer, conn: socket.socket, reader: Reader) -> None:
        for _ in range(2):  # two requests per connection, then an idle close
            if (request := reader.request()) is None:
                return
            server.record(request)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    context = server_context(certificate)
    context.sni_callback = lambda sock, name, ctx: names.append(name)  # type: ignore[assignment,func-returns-value]
    server = serve(handler, tls=context)

    async def main() -> None:
        async with pool_for(server.port, tls=True, server_hostname="localhost",
                            ssl_context=client_context(certificate)) as pool:
            for i in range(4):
                done = Answers()
                pool.send(RequestTemplate(pool.authority, "/", {"ce-id": "1"}).build(b"{}"), done,
                          timeout=5, keep_body=True)
                assert [(a.status, a.body, a.error) for a in await done.wait()] == [(200, b"ok", None)]

    run(main())
    assert len(server.requests) == 4 and server.connections == 2
    assert names == ["localhost", "localhost"]
    assert server.requests[0].startswith(b"POST / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % server.port)


def test_tls_verifies_the_certificate_by_default(run: Run, serve: Serve, certificate: tuple[Path, Path]) -> None:
    server = serve(answering(OK), tls=server_context(certificate))

    async def main() -> None:
        async with pool_for(server.port, tls=True) as pool:  # the system's CAs: not ours
            with pytest.raises(ssl.SSLCertVerificationError) as caught:
                await ask(pool)
            assert isinstance(caught.value, OSError)  # so the channel retries it, not rejects
        async with pool_for(server.port, tls=True, server_hostname="wrong.example",
                            ssl_context=client_context(certificate)) as pool:
            with pytest.raises(ssl.SSLCertVerificationError):
                await ask(pool)
        async with pool_for(server.port, tls=True, ssl_context=client_context(certificate)) as pool:
            assert await ask(pool) == (200, b"")

    run(main())
    assert server.requests and len(server.requests) == 1


# -- abort() -----------------------------------------------------------------------------------


def test_abort_breaks_off_requests_in_flight_and_refuses_later_ones(
    run: Run, serve: Serve, tls: tuple[Path, Path] | None
) -> None:
    closed = threading.Event()
    server, options = start(serve, until_closed(closed), tls)

    async def main() -> None:
        async with pool_for(server.port, limit=1, **options) as pool:
            done = Answers()
            pool.send(build(pool, b"in flight"), done, timeout=30)
            pool.send(build(pool, b"waiting"), done, timeout=30)  # beyond the limit
            await until(lambda: server.requests, "the request to reach the silent server")
            pool.abort()
            answers = await done.wait(2)
            assert [type(a.error) for a in answers] == [Aborted, Aborted]  # not resent
            for _ in range(2):  # refused at once: the silent server would hold them 30 s
                with pytest.raises(Aborted):
                    await post(pool, b"later")
            await until(discarded(pool))
            await until(closed.is_set, "the server to see the connection closed")
            assert len(done.items) == 2  # each done called once

    run(main())
    assert server.connections == 1 and server.bodies() == [b"in flight"]
    assert isinstance(Aborted(), OSError)  # the channel treats it as a transport failure


def test_shed_fails_only_the_requests_never_sent(run: Run, serve: Serve) -> None:
    """What the circuit breaker relies on: requests queued beyond the limit are withdrawn with
    the given error (the server never sees them); the one on a connection runs on."""
    hold = threading.Event()

    def slow(server_: RawServer, conn: socket.socket, reader: Reader) -> None:
        while (request := reader.request()) is not None:
            server_.record(request)
            hold.wait(10)
            conn.sendall(OK)

    server = serve(slow)

    async def main() -> None:
        async with pool_for(server.port, limit=1) as pool:
            done = Answers()
            pool.send(build(pool, b"sent"), done, timeout=30)
            for body in (b"queued-1", b"queued-2"):
                pool.send(build(pool, body), done, timeout=30)
            await until(lambda: server.requests, "the first request to reach the server")
            assert pool.shed(ConnectionError("held back")) == 2
            shed = await done.wait(2)
            assert [str(a.error) for a in shed] == ["held back", "held back"]
            hold.set()
            answers = await done.wait(3)
            assert answers[-1].status == 200 and answers[-1].error is None
            assert pool.shed(ConnectionError("nothing waits")) == 0

    run(main())
    assert server.bodies() == [b"sent"]


def test_abort_before_any_request_never_connects(run: Run, serve: Serve) -> None:
    server = serve(answering(OK))

    async def main() -> None:
        pool = HttpPool("127.0.0.1", server.port)
        pool.abort()
        with pytest.raises(Aborted):
            await ask(pool)
        assert pool.connections == 0  # no connect was started (it would count)

    run(main())
    assert server.connections == 0


def test_abort_during_the_connect(run: Run, serve: Serve) -> None:
    closed = threading.Event()
    server = serve(until_closed(closed))  # plain TCP: the TLS handshake never ends

    async def main() -> None:
        async with pool_for(server.port, tls=True, connect_timeout=30) as pool:
            done = Answers()
            pool.send(build(pool), done, timeout=30)
            await until(lambda: server.connections == 1)
            pool.abort()
            assert [type(a.error) for a in await done.wait()] == [Aborted]

    run(main())


# -- the HTTP channel over the transport -------------------------------------------------------


async def publish(config: HttpConfig, messages: list[Message]) -> dict[str, tuple[Outcome, str]]:
    outcomes: dict[str, tuple[Outcome, str]] = {}

    def report(message: Message, outcome: Outcome, reason: str, retry_after: float = 0.0) -> None:
        outcomes[message.id] = (outcome, reason)

    channel = config.create(SOURCE)
    channel.publish(messages, report)
    await until(lambda: len(outcomes) == len(messages), f"{len(messages)} outcomes", 20)
    await channel.aclose(5)
    return outcomes


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_channel_outcomes_and_headers_on_the_wire(run: Run, mode: str) -> None:
    answers = {"m-1": 400, "m-2": 503, "m-3": 429}
    overrides = {"tenant": "acme co", "region": "eu"}  # "region" also comes from the message
    with DumperServer(out=io.StringIO(), keep=True,
                      respond=lambda event, headers: answers.get(event["id"])) as dumper:
        config = HttpConfig(sink=dumper.url + "events?x=1", mode=mode, overrides=overrides, concurrency=2,
                            timeout=2.0)  # a refusal with no 2xx after it: a verdict at the deadline
        messages = [make_message(i, region={"DataType": "String", "StringValue": "us"}) for i in range(5)]
        outcomes = run(publish(config, messages))
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


def test_channel_retries_garbage_and_silence(run: Run, serve: Serve) -> None:
    garbage = serve(answering(b"SPAM SPAM SPAM\r\n\r\n"))
    config = HttpConfig(sink=f"http://127.0.0.1:{garbage.port}/", concurrency=1)
    outcomes = run(publish(config, [make_message(0), make_message(1)]))
    for outcome, reason in outcomes.values():  # one attempt each: the worker retries
        assert outcome is Outcome.RETRY and "ProtocolError" in reason
    assert garbage.connections == 2  # closed after the garbage: a new one for the next message

    silent = serve(until_closed(threading.Event()))
    config = HttpConfig(sink=f"http://127.0.0.1:{silent.port}/", concurrency=1, timeout=0.3)
    outcome, reason = run(publish(config, [make_message()]))["m-0"]
    assert outcome is Outcome.RETRY and "TimeoutError" in reason



def test_an_endless_head_is_a_protocol_error_not_a_memory_sink(run: Run, serve: Serve) -> None:
    """Header lines that never end: refused past MAX_HEAD, long before the request's deadline."""
    def endless(server: RawServer, conn: socket.socket, reader: Reader) -> None:
        reader.request()
        conn.sendall(b"HTTP/1.1 200 OK\r\n")
        try:
            for _ in range(2000):
                conn.sendall(b"X-Filler: " + b"f" * 100 + b"\r\n")
        except OSError:
            pass

    server = serve(endless)

    async def scenario() -> None:
        async with pool_for(server.port, limit=1) as pool:
            with pytest.raises(ProtocolError, match="head longer"):
                await ask(pool, timeout=60)

    run(scenario())


def test_an_interim_answers_headers_do_not_carry_over(run: Run, serve: Serve) -> None:
    server = serve(answering(b"HTTP/1.1 103 Early Hints\r\nRetry-After: 99\r\n\r\n"
                             b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n"))

    async def scenario() -> None:
        async with pool_for(server.port, limit=1) as pool:
            answers = Answers()
            pool.send(build(pool), answers, timeout=5)
            (answer,) = await answers.wait()
            assert (answer.status, answer.retry_after, answer.error) == (503, 0.0, None)

    run(scenario())
