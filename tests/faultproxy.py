"""A TCP fault proxy of our own, for the fault tests (no ``tc netem`` here, no toxiproxy).

``FaultProxy`` listens on ``127.0.0.1:<free port>`` and forwards every connection to an upstream
``host:port`` (LocalStack, the tansu broker, an HTTP sink). It runs its own asyncio event loop in
a background thread; the test thread switches faults at any time with a small thread-safe API::

    with FaultProxy(f"127.0.0.1:{port}", http=True) as proxy:
        proxy.set(Fault.RESET)                 # in effect when set() returns
        proxy.clear()                          # back to pass-through
        with proxy.fault(HttpError(SQS_THROTTLING, fraction=0.2)):
            ...                                # cleared on exit
        proxy.address, proxy.url               # "127.0.0.1:PORT", "http://127.0.0.1:PORT/"

Faults (one at a time; ``set`` replaces the current one):

- ``Fault.PASS``: relay bytes both ways as they come.
- ``Delay(seconds)``: every chunk from the upstream reaches the client ``seconds`` after it arrived
  (added latency; throughput is unchanged).
- ``Trickle(chunk, pause)``: the upstream's bytes reach the client ``chunk`` bytes at a time with
  ``pause`` between pieces: an answer takes forever while bytes keep coming. With ``sticky``
  (the default) a connection that trickled keeps trickling after the fault is cleared, as a
  degraded path would: only a client that gives up on it and reconnects recovers.
- ``Fault.RESET``: every open connection is reset (``SO_LINGER`` 0, then close: an RST), and so
  is every new one right after it is accepted.
- ``Fault.REFUSE``: the listening socket is closed, so connects are refused; open connections are
  reset (the peer is gone). Clearing it listens again on the same port.
- ``Fault.STALL``: connections are accepted and read, and never answered; nothing is forwarded.
  Every open connection goes silent too. When the stall ends the silent connections are closed.
- ``HttpError(response, fraction, actions)``: (``http=True``) a ``fraction`` of the requests,
  optionally only those of some SQS ``actions`` (``X-Amz-Target: AmazonSQS.<Action>``), get the
  canned ``response`` instead of being forwarded; the connection stays open.
- ``SlowActions(actions, seconds)``: (``http=True``) requests of those SQS actions are held
  ``seconds`` before they are forwarded (SQS is slow to act on them).
- ``SlowPaths(method, fragment, seconds)``: (``http=True``) requests of that method whose target
  contains ``fragment`` are held ``seconds`` (one S3 object written late, say).

With ``http=True`` the proxy parses the client's requests (head, then a ``Content-Length`` body;
our clients never pipeline and never send chunked requests), so it knows where each one starts;
answers are relayed as raw bytes. ``stats()`` tells what the proxy saw and did, so a test can
check its fault really hit the traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Coroutine, Iterator
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

__all__ = [
    "HTTP_429", "HTTP_500", "SQS_INTERNAL_ERROR", "SQS_THROTTLING", "CannedResponse", "Delay",
    "Fault", "FaultProxy", "FaultSpec", "HttpError", "ProxyStats", "SlowActions", "SlowPaths", "Trickle",
]

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
_READ_SIZE = 64 * 1024
_MAX_HEAD = 64 * 1024  # request head limit in http mode
_OUT_QUEUE = 64  # chunks buffered toward a client: backpressure on the upstream beyond that
_CALL_TIMEOUT = 10.0  # how long the test thread waits for the loop to apply a change
_T = TypeVar("_T")


# -- faults -----------------------------------------------------------------------------------


class Fault(enum.Enum):
    """The faults without parameters."""

    PASS = "pass"
    RESET = "reset"
    REFUSE = "refuse"
    STALL = "stall"


@dataclass(frozen=True, slots=True)
class Delay:
    seconds: float

    def __post_init__(self) -> None:
        if self.seconds < 0:
            raise ValueError("a delay cannot be negative")


@dataclass(frozen=True, slots=True)
class Trickle:
    chunk: int = 1
    pause: float = 0.2
    sticky: bool = True

    def __post_init__(self) -> None:
        if self.chunk < 1 or self.pause < 0:
            raise ValueError("a trickle needs chunk >= 1 and pause >= 0")


@dataclass(frozen=True, slots=True)
class CannedResponse:
    """An HTTP/1.1 answer the proxy gives instead of the upstream's (keep-alive)."""

    status: int
    reason: str
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()

    def encode(self) -> bytes:
        lines = [f"HTTP/1.1 {self.status} {self.reason}"]
        lines += [f"{name}: {value}" for name, value in self.headers]
        lines.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


def _sqs_error(status: int, reason: str, code: str, message: str, fault: str) -> CannedResponse:
    """SQS's JSON-protocol error shape, as botocore parses it (``__type`` plus the query-compatible
    ``x-amzn-query-error`` header)."""
    body = f'{{"__type":"com.amazonaws.sqs#{code}","message":"{message}"}}'.encode()
    return CannedResponse(status, reason, body, (
        ("Content-Type", "application/x-amz-json-1.0"),
        ("x-amzn-RequestId", "00000000-0000-0000-0000-00000000fa17"),
        ("x-amzn-query-error", f"{code};{fault}"),
    ))


# What SQS answers when it throttles (a modeled error of ReceiveMessage & co; botocore counts
# ``RequestThrottled`` as a throttling error) and when it fails inside.
SQS_THROTTLING = _sqs_error(400, "Bad Request", "RequestThrottled", "Rate exceeded", "Sender")
SQS_INTERNAL_ERROR = _sqs_error(500, "Internal Server Error", "InternalFailure",
                                "The request processing has failed because of an unknown error.", "Receiver")
HTTP_500 = CannedResponse(500, "Internal Server Error", b"injected fault", (("Content-Type", "text/plain"),))
HTTP_429 = CannedResponse(429, "Too Many Requests", b"injected fault",
                          (("Content-Type", "text/plain"), ("Retry-After", "1")))


@dataclass(frozen=True, slots=True)
class HttpError:
    response: CannedResponse
    fraction: float = 1.0
    actions: frozenset[str] | None = None  # None: every request

    def __post_init__(self) -> None:
        if not 0 <= self.fraction <= 1:
            raise ValueError("the fraction must be between 0 and 1")


@dataclass(frozen=True, slots=True)
class SlowActions:
    actions: frozenset[str]
    seconds: float

    def __post_init__(self) -> None:
        if self.seconds < 0 or not self.actions:
            raise ValueError("slow actions need some actions and a delay >= 0")


@dataclass(frozen=True, slots=True)
class SlowPaths:
    method: str
    fragment: str
    seconds: float

    def __post_init__(self) -> None:
        if self.seconds < 0 or not self.fragment:
            raise ValueError("slow paths need a path fragment and a delay >= 0")


FaultSpec = Fault | Delay | Trickle | HttpError | SlowActions | SlowPaths
_HTTP_ONLY = (HttpError, SlowActions, SlowPaths)


@dataclass(frozen=True, slots=True)
class ProxyStats:
    """What the proxy saw and did so far."""

    connections: int = 0  # accepted
    resets: int = 0  # connections reset (open ones at set(RESET/REFUSE), and new ones)
    stalled: int = 0  # connections that went silent
    trickled: int = 0  # connections that got at least one trickled piece
    requests: Counter[str] = field(default_factory=Counter)  # http mode: per action ("" = none)
    canned: Counter[str] = field(default_factory=Counter)  # http mode: canned answers per action
    slowed: Counter[str] = field(default_factory=Counter)  # http mode: held requests per action (or path fragment)


class _ProtocolError(Exception):
    """The client sent something the http mode does not handle: the connection is dropped."""


@dataclass(slots=True)
class _Request:
    raw: bytes
    action: str
    method: str
    target: str


# -- one relayed connection ---------------------------------------------------------------------


class _Connection:
    """A client connection and its upstream connection; lives on the proxy's loop."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.out: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(_OUT_QUEUE)
        self.pinned: Trickle | None = None  # a sticky trickle this connection keeps
        self.trickled = False
        self.silent = False  # stalled: nothing more is forwarded either way
        self.tasks: list[asyncio.Task[None]] = []

    def reset(self) -> None:
        """RST to the client (SO_LINGER 0, then close) and drop the upstream side."""
        sock = self.client.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.client.transport.abort()
        if self.upstream is not None:
            self.upstream.transport.abort()
        for task in self.tasks:
            task.cancel()

    def close(self) -> None:
        """An orderly close (FIN) of both sides."""
        for writer in (self.client, self.upstream):
            if writer is not None:
                writer.close()
        for task in self.tasks:
            task.cancel()


# -- the proxy ----------------------------------------------------------------------------------


class FaultProxy:
    """See the module docstring. Binds and starts in the constructor; ``close()`` stops it."""

    def __init__(self, upstream: str, *, http: bool = False, seed: int | None = None,
                 port: int = 0) -> None:
        self.upstream_host, self.upstream_port = _parse_upstream(upstream)
        self.http = http
        self._random = random.Random(seed)  # used on the loop thread only
        self._fault: FaultSpec = Fault.PASS
        self._fault_changed: asyncio.Event | None = None  # created on the loop
        self._switching: asyncio.Lock | None = None  # one switch at a time (they await)
        self._connections: set[_Connection] = set()
        self._server: asyncio.Server | None = None
        self._stats_lock = threading.Lock()
        self._stats = ProxyStats()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"faultproxy-{upstream}",
                                        daemon=True)
        self._thread.start()
        self._closed = False
        try:
            self._call(self._init(port))
        except BaseException:
            self._stop_loop()
            raise
        assert self._server is not None
        self.port: int = self._server.sockets[0].getsockname()[1]
        log.info("fault proxy %s -> %s:%d (%s)", self.address, self.upstream_host, self.upstream_port,
                 "http" if http else "tcp")

    # -- the test thread's API ---------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/"

    @property
    def current(self) -> FaultSpec:
        return self._fault

    def set(self, fault: FaultSpec) -> None:
        """Switch to ``fault``; it is in effect for new and open connections when this returns."""
        if isinstance(fault, _HTTP_ONLY) and not self.http:
            raise ValueError(f"{type(fault).__name__} needs a proxy made with http=True")
        self._call(self._apply(fault))
        log.info("fault proxy %s: %s", self.address, _describe(fault))

    def clear(self) -> None:
        self.set(Fault.PASS)

    @contextlib.contextmanager
    def fault(self, fault: FaultSpec) -> Iterator[FaultProxy]:
        """``fault`` for the duration of the ``with`` block, then pass-through."""
        self.set(fault)
        try:
            yield self
        finally:
            self.clear()

    def stats(self) -> ProxyStats:
        with self._stats_lock:
            s = self._stats
            return ProxyStats(s.connections, s.resets, s.stalled, s.trickled, Counter(s.requests),
                              Counter(s.canned), Counter(s.slowed))

    def close(self) -> None:
        """Stop listening, drop every connection and stop the loop thread. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            self._call(self._shutdown())
        finally:
            self._stop_loop()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FaultProxy({self.address} -> {self.upstream_host}:{self.upstream_port}, {_describe(self._fault)})"

    # -- plumbing between the threads ------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(_CALL_TIMEOUT)
        except FutureTimeout:
            future.cancel()
            raise TimeoutError(f"fault proxy {self!r} did not apply a change in {_CALL_TIMEOUT:.0f}s") from None

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(_CALL_TIMEOUT)
        if not self._thread.is_alive():
            self._loop.close()

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            s = self._stats
            self._stats = ProxyStats(
                s.connections + deltas.get("connections", 0), s.resets + deltas.get("resets", 0),
                s.stalled + deltas.get("stalled", 0), s.trickled + deltas.get("trickled", 0),
                s.requests, s.canned, s.slowed,
            )

    def _count_action(self, kind: str, action: str) -> None:
        with self._stats_lock:
            getattr(self._stats, kind)[action] += 1

    # -- on the loop: listening and switching ----------------------------------------------

    async def _init(self, port: int) -> None:
        self._fault_changed = asyncio.Event()
        self._switching = asyncio.Lock()
        await self._listen(port)

    async def _listen(self, port: int) -> None:
        # reuse_address: listening again on the same port after REFUSE, past TIME_WAIT leftovers.
        self._server = await asyncio.start_server(self._accept, HOST, port, reuse_address=True,
                                                  limit=_MAX_HEAD, backlog=256)

    async def _apply(self, fault: FaultSpec) -> None:
        assert self._switching is not None
        async with self._switching:  # closing and re-listening await: switches must not interleave
            await self._switch(fault)

    async def _switch(self, fault: FaultSpec) -> None:
        previous, self._fault = self._fault, fault
        if fault is Fault.REFUSE and self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if fault in (Fault.RESET, Fault.REFUSE):
            self._reset_all()
        if fault is Fault.STALL:
            for conn in self._connections:
                self._silence(conn)
        if previous is Fault.STALL and fault is not Fault.STALL:
            for conn in [c for c in self._connections if c.silent]:
                conn.close()
        if fault is not Fault.REFUSE and self._server is None:
            await self._listen(self.port)
        assert self._fault_changed is not None
        changed, self._fault_changed = self._fault_changed, asyncio.Event()
        changed.set()  # wakes writers waiting out a stall or a delay

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for conn in list(self._connections):
            conn.reset()
        tasks = [task for conn in self._connections for task in conn.tasks]
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)

    def _reset_all(self) -> None:
        for conn in list(self._connections):
            conn.reset()
            self._count(resets=1)

    def _silence(self, conn: _Connection) -> None:
        if not conn.silent:
            conn.silent = True
            self._count(stalled=1)

    # -- on the loop: one connection -----------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._count(connections=1)
        conn = _Connection(writer)
        if self._fault is Fault.RESET:
            conn.reset()
            self._count(resets=1)
            return
        self._connections.add(conn)
        try:
            if self._fault is Fault.STALL:
                self._silence(conn)
                await self._swallow(reader)
                return
            try:
                up_reader, conn.upstream = await asyncio.open_connection(
                    self.upstream_host, self.upstream_port, limit=_READ_SIZE)
            except OSError as exc:  # the upstream is down: so are we, for this client
                log.debug("fault proxy %s: upstream unreachable: %s", self.address, exc)
                conn.reset()
                return
            await self._relay(conn, reader, up_reader)
        except (OSError, asyncio.IncompleteReadError, _ProtocolError) as exc:
            log.debug("fault proxy %s: connection ended: %r", self.address, exc)
        except asyncio.CancelledError:
            pass  # reset or closed by a fault
        finally:
            self._connections.discard(conn)
            conn.close()

    async def _relay(self, conn: _Connection, client: asyncio.StreamReader,
                     upstream: asyncio.StreamReader) -> None:
        forward = self._forward_requests(conn, client) if self.http else self._forward_bytes(conn, client)
        conn.tasks = [
            asyncio.ensure_future(forward),
            asyncio.ensure_future(self._read_upstream(conn, upstream)),
            asyncio.ensure_future(self._write_client(conn)),
        ]
        to_upstream, _, to_client = conn.tasks
        # Either end closing ends the connection (our clients never half-close); the client
        # writer first flushes what the upstream sent before it closed.
        done, _ = await asyncio.wait([to_upstream, to_client], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.debug("fault proxy %s: %r", self.address, task.exception())
        for task in conn.tasks:
            task.cancel()
        await asyncio.gather(*conn.tasks, return_exceptions=True)

    async def _swallow(self, reader: asyncio.StreamReader) -> None:
        """A stalled connection: read and drop until the client goes away."""
        while await reader.read(_READ_SIZE):
            pass

    # client -> upstream

    async def _forward_bytes(self, conn: _Connection, client: asyncio.StreamReader) -> None:
        assert conn.upstream is not None
        while data := await client.read(_READ_SIZE):
            if self._is_silent(conn):
                continue
            conn.upstream.write(data)
            await conn.upstream.drain()

    async def _forward_requests(self, conn: _Connection, client: asyncio.StreamReader) -> None:
        assert conn.upstream is not None
        while (request := await _read_request(client)) is not None:
            self._count_action("requests", request.action)
            if self._is_silent(conn):
                continue
            fault = self._fault
            if isinstance(fault, HttpError) and _matches(fault.actions, request.action) \
                    and self._random.random() < fault.fraction:
                self._count_action("canned", request.action)
                await conn.out.put((time.monotonic(), fault.response.encode()))
                continue
            if isinstance(fault, SlowActions) and request.action in fault.actions:
                self._count_action("slowed", request.action)
                await asyncio.sleep(fault.seconds)
            if isinstance(fault, SlowPaths) and request.method == fault.method and fault.fragment in request.target:
                self._count_action("slowed", fault.fragment)
                await asyncio.sleep(fault.seconds)
            conn.upstream.write(request.raw)
            await conn.upstream.drain()

    # upstream -> client

    async def _read_upstream(self, conn: _Connection, upstream: asyncio.StreamReader) -> None:
        try:
            while data := await upstream.read(_READ_SIZE):
                await conn.out.put((time.monotonic(), data))
        except OSError:
            pass
        await conn.out.put(None)  # the upstream closed: the client writer closes after the rest

    async def _write_client(self, conn: _Connection) -> None:
        while (item := await conn.out.get()) is not None:
            arrived, data = item
            await self._deliver(conn, arrived, data)

    async def _deliver(self, conn: _Connection, arrived: float, data: bytes) -> None:
        """Write one chunk to the client as the current fault allows, re-checking it as we go."""
        while data:
            fault = conn.pinned or self._fault
            if self._is_silent(conn):
                await self._fault_change()
                continue
            if isinstance(fault, Delay):
                wait = arrived + fault.seconds - time.monotonic()
                if wait > 0:
                    await self._fault_change(wait)
                    continue
            if isinstance(fault, Trickle):
                if not conn.trickled:
                    conn.trickled = True
                    self._count(trickled=1)
                if fault.sticky:
                    conn.pinned = fault
                piece, data = data[:fault.chunk], data[fault.chunk:]
                conn.client.write(piece)
                await conn.client.drain()
                if data:
                    await asyncio.sleep(fault.pause)
                continue
            conn.client.write(data)
            await conn.client.drain()
            return

    def _is_silent(self, conn: _Connection) -> bool:
        if self._fault is Fault.STALL:
            self._silence(conn)
        return conn.silent

    async def _fault_change(self, timeout: float | None = None) -> None:
        """Wait until the fault is switched (or ``timeout`` passes)."""
        assert self._fault_changed is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._fault_changed.wait(), timeout)


# -- http parsing and small helpers -----------------------------------------------------------------


async def _read_request(reader: asyncio.StreamReader) -> _Request | None:
    """One request (head + Content-Length body), or None when the client closed between requests."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise
    except asyncio.LimitOverrunError:
        raise _ProtocolError(f"request head larger than {_MAX_HEAD} bytes") from None
    length, action = 0, ""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip())
        elif name == b"transfer-encoding":
            raise _ProtocolError("chunked requests are not supported")
        elif name == b"x-amz-target":
            action = value.strip().decode("latin-1").rpartition(".")[2]
    body = await reader.readexactly(length) if length else b""
    method, _, rest = head.partition(b"\r\n")[0].decode("latin-1").partition(" ")
    return _Request(head + body, action, method, rest.rpartition(" ")[0])


def _matches(actions: frozenset[str] | None, action: str) -> bool:
    return actions is None or action in actions


def _parse_upstream(upstream: str) -> tuple[str, int]:
    """``host:port`` or an ``http://host:port/...`` URL."""
    if "://" in upstream:
        parts = urlsplit(upstream)
        if not parts.hostname or not parts.port:
            raise ValueError(f"upstream URL {upstream!r} needs a host and a port")
        return parts.hostname, parts.port
    host, sep, port = upstream.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"upstream {upstream!r} is not host:port")
    return host, int(port)


def _describe(fault: FaultSpec) -> str:
    if isinstance(fault, Fault):
        return fault.value
    if isinstance(fault, HttpError):
        actions = ",".join(sorted(fault.actions)) if fault.actions else "all requests"
        return f"answer {fault.response.status} to {fault.fraction:.0%} of {actions}"
    return repr(fault)
