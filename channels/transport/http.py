"""An HTTP/1.1 client on the event loop, for the sink's POSTs and SQS's: a keep-alive connection
pool per origin, hundreds of requests in flight at a CPU cost per request that does not grow
with them (threads paid for each one in GIL hand-offs).

- Each connection is an ``asyncio.Protocol`` whose answers are framed by httptools' response
  parser (llhttp, C; uvicorn's client side): Content-Length, chunked (trailers included), until
  close, 1xx before the final answer. llhttp refuses what is unsafe: both Content-Length and
  Transfer-Encoding (RFC 9112 6.3), duplicate lengths, a bad chunk size.
- A request is one bytes object, written at once (``RequestTemplate`` encodes the constant part
  once). ``send`` takes a callback: no task or coroutine per request on the hot path;
  ``request`` awaits a future, for callers that want one.
- One deadline per request, from ``send`` to the last byte of the answer: a server that trickles
  its answer cannot hold it, and the time a request waits for a free connection (the pool's
  ``limit``) counts too, so a queue behind a slow server cannot hold a request past its deadline
  either. A request whose deadline passes while it waits is failed and never written: nothing
  is sent late for a caller that has given up on it.
- A kept body (``keep_body``) is bounded by ``max_body``: past it the answer's status stands, its
  body is dropped (``None``) and the connection is closed rather than read to its end.
- A connection goes back to the pool only after a complete answer that allows keep-alive; any
  byte beyond that answer (in the same read, or while it is idle: a stray answer, a close)
  discards it, so an answer is never taken for another request's (httpcore does the same with a
  readability check). A closed connection's place goes to the requests waiting for one.
- A reused connection that closes before any byte of the answer arrived (the server closed it
  while idle) is retried once on a new connection: all our requests are safe to repeat.
- Keep-alive expiry: an idle connection is not reused after ``keepalive_expiry`` seconds (less
  if the answer's ``Keep-Alive: timeout=N`` says the server closes sooner), so that a request is
  not written on a connection its server is closing. It is checked when a connection is picked
  (one timestamp compared); expired idle connections are closed then, or by the deadline sweep.
- The pool's state is its connections' states (httpcore's model): a connection tells its pool
  of each change of state through one call (``_Owner``), where the pool updates its two
  indexes (idle connections, connects in flight); no counter is kept by hand elsewhere.

Through an HTTP forward proxy (``proxy``, ``channels.transport.proxy``), as curl and urllib3
do: an http:// origin's requests go to the proxy in absolute-form (``POST http://host:port/path``,
with ``Proxy-Authorization`` if the proxy URL had credentials: ``HttpPool.template``); for an
https:// origin each connection is a ``CONNECT host:port`` tunnel through the proxy, and TLS to
the origin starts over it once the proxy answered 2xx (``loop.start_tls``). A proxy's refusal of
the tunnel (407, 403, 502, ...) fails the connect with a one-line reason.

Errors reach the callback as an exception: ``TimeoutError``; ``ProtocolError`` (the answer is
not HTTP/1.x we can frame); ``Aborted`` (``abort()``); other ``OSError`` (refused, reset, TLS).
"""

from __future__ import annotations

import asyncio
import email.utils
import enum
import functools
import re
import ssl
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import httptools
from mypy_extensions import mypyc_attr

from channels.transport.proxy import Proxy

__all__ = [
    "Aborted",
    "Done",
    "HttpPool",
    "PoolState",
    "ProtocolError",
    "RequestTemplate",
    "default_context",
    "encode_headers",
]

MAX_INTERIM = 32  # 1xx answers before the final one
_SWEEP = 0.05  # seconds between two checks of the requests' deadlines
MAX_HEAD = 65536  # bytes before the final answer's headers end (counted by reads: a bound, not exact)
# A kept body's default bound: SQS answers (ten messages of up to 1 MiB each, JSON-escaped) fit.
MAX_BODY = 64 * 1024 * 1024
# An idle connection's default lifetime: below the shortest idle timeout of common servers, so
# that we close it first. gunicorn's --keep-alive is 2 s, and its UvicornWorker passes it on as
# uvicorn's timeout_keep_alive; uvicorn alone: 5 s; Node.js's keepAliveTimeout: 5 s (65 s in its
# newest releases); Apache's KeepAliveTimeout: 5 s; nginx's keepalive_timeout: 75 s. A reconnect
# after 1.5 s idle costs a connect; a request written on a connection being closed fails.
KEEPALIVE_EXPIRY = 1.5
# A header block is "name: value\r\n"*: names are RFC 9110 tokens; values have no CR, LF or NUL.
# One fullmatch over the whole block, plus one count of its LFs (a value "a\r\nX: b" would match
# as two headers), checks every header of a request.
_HEADER_BLOCK = re.compile(r"(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+: [^\r\n\0]*\r\n)*")
_TARGET = re.compile(r"[\x21-\x7e]+")

Headers = Mapping[str, str] | Sequence[tuple[str, str]]
Done = Callable[[int, float, "bytes | None", "BaseException | None"], None]
"""``done(status, retry_after, body, error)``: the final status, the seconds of its
``Retry-After`` (0.0 if none), the body (None unless kept); or an error (status 0)."""


@mypyc_attr(native_class=False)  # compiled (setup.py), a class cannot subclass OSError
class ProtocolError(OSError):
    """The server's answer is not HTTP/1.x this client can frame; the connection was closed."""


@mypyc_attr(native_class=False)  # compiled (setup.py), a class cannot subclass OSError
class Aborted(OSError):
    """``HttpPool.abort()`` was called: the request was broken off, or refused."""


class _TooLarge(Exception):
    """The answer's body is longer than the request's ``max_body``: parsing stops."""


class _Stray(Exception):
    """A second answer begins in the bytes of the first: parsing stops before its callbacks
    overwrite the first one's status, body or Retry-After."""


@functools.cache
def default_context() -> ssl.SSLContext:
    """One ``ssl.create_default_context()`` per process (loading the CA store costs milliseconds)."""
    return ssl.create_default_context()


def encode_headers(headers: Headers) -> bytes:
    """``name: value\\r\\n`` per header, checked and latin-1 encoded; ValueError if invalid."""
    items = headers.items() if isinstance(headers, Mapping) else headers
    block = "".join([f"{name}: {value}\r\n" for name, value in items])
    if not _HEADER_BLOCK.fullmatch(block) or block.count("\n") != len(items):
        for name, value in items:  # which one (the error path only)
            line = f"{name}: {value}\r\n"
            if not _HEADER_BLOCK.fullmatch(line) or line.count("\n") != 1:
                raise ValueError(f"invalid HTTP header (CR, LF or NUL in the value, or a name that is "
                                 f"not a token): {name[:40]!r}: {value[:60]!r}")
        raise AssertionError("unreachable")
    try:
        return block.encode("latin-1")
    except UnicodeEncodeError as exc:  # a ValueError too
        raise ValueError(f"HTTP header value not latin-1: {block[max(0, exc.start - 40):exc.end + 20]!r}") from None


class RequestTemplate:
    """POSTs to one target of one origin: the request line, ``Host`` and the constant headers are
    encoded once; ``build`` adds a request's own headers, ``Content-Length`` and the body."""

    __slots__ = ("_prefix",)

    def __init__(self, authority: str, target: str, headers: Headers = ()) -> None:
        if not _TARGET.fullmatch(target):
            raise ValueError("invalid request target: it must be printable ASCII without spaces "
                             "(not shown: a path may carry a secret)")
        self._prefix = (b"POST %s HTTP/1.1\r\n" % target.encode("ascii")
                        + encode_headers({"Host": authority, "Accept-Encoding": "identity"})
                        + encode_headers(headers))

    def build(self, body: bytes, headers: bytes = b"") -> bytes:
        """One request; ``headers``: already encoded (``encode_headers``)."""
        return b"%s%sContent-Length: %d\r\n\r\n%s" % (self._prefix, headers, len(body), body)


def _seconds(retry_after: bytes) -> float:
    """A ``Retry-After`` value (delay-seconds or an HTTP-date) as seconds from now, 0..3600."""
    text = retry_after.strip()
    if text.isdigit():
        return float(min(int(text), 3600))
    try:
        when = email.utils.parsedate_to_datetime(text.decode("latin-1"))
    except (TypeError, ValueError, IndexError):
        return 0.0
    return max(0.0, min(3600.0, when.timestamp() - time.time()))


def authority(host: str, port: int, tls: bool) -> str:
    """The ``Host`` header's value: the port only when it is not the scheme's default."""
    name = f"[{host}]" if ":" in host else host  # an IPv6 literal
    return name if port == (443 if tls else 80) else f"{name}:{port}"


class _Request:
    __slots__ = ("attempts", "data", "deadline", "done", "finished", "keep_body", "max_body", "timeout")

    def __init__(self, data: bytes, done: Done, timeout: float, keep_body: bool, max_body: int) -> None:
        self.data = data
        self.done = done
        self.timeout = timeout
        self.keep_body = keep_body
        self.max_body = max_body
        self.attempts = 0
        self.finished = False
        self.deadline = 0.0  # loop time; 0: not started

    def finish(self, status: int, body: bytes | None, error: BaseException | None,
               retry_after: float = 0.0) -> None:
        if self.finished:
            return
        self.finished = True
        self.done(status, retry_after, body, error)


class _State(enum.Enum):
    """A connection's life: CONNECTING -> IDLE <-> ACTIVE -> CLOSING -> CLOSED; a failed connect
    or the server's close goes straight to CLOSED."""

    CONNECTING = "connecting"
    IDLE = "idle"
    ACTIVE = "active"
    CLOSING = "closing"  # closed by us; it keeps its slot until its connection_lost
    CLOSED = "closed"


# Module names for the members: ``_State.IDLE`` costs ~0.3 us per lookup on Python 3.11 (the
# enum metaclass), a global ~0.03 us, and a request passes through a dozen of them.
_CONNECTING, _IDLE, _ACTIVE, _CLOSING, _CLOSED = _State


class _Owner(Protocol):
    """All a connection may tell its pool (httpcore's pool asks its connections instead; ours are
    told, so that the pool's indexes stay O(1) per request)."""

    def connection_changed(self, conn: _Connection, old: _State | None, new: _State) -> None:
        """``conn`` went from ``old`` to ``new`` (``old`` None: it was just made)."""

    def resend(self, request: _Request) -> None:
        """Send ``request`` once more, on another connection: a reused one closed before any
        byte of its answer (the server closed it while idle, as we wrote)."""


def _keep_alive_timeout(value: bytes) -> int | None:
    """The ``timeout`` parameter of a ``Keep-Alive`` header (``timeout=5, max=100``), or None."""
    for param in value.split(b","):
        name, _, seconds = param.partition(b"=")
        if name.strip().lower() == b"timeout":
            seconds = seconds.strip()
            return int(seconds) if seconds.isdigit() else None
    return None


def _idle_limit(server_timeout: int) -> float:
    """How long we keep a connection idle when its server closes it after ``server_timeout``
    seconds: a second less (half of it below 2 s), since our idle clock starts when the answer
    arrives and the server's when it was sent, and the next request needs time to arrive too."""
    return max(server_timeout - 1.0, server_timeout / 2)


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time (no pipelining).

    ``state`` changes in ``_become`` only, which tells the owner (``_Owner.connection_changed``):
    the pool's view of its connections follows from that one call."""

    def __init__(self, owner: _Owner, loop: asyncio.AbstractEventLoop, keepalive_expiry: float) -> None:
        self._owner = owner
        self._loop = loop
        self._keepalive_expiry = keepalive_expiry
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._request: _Request | None = None
        self._status = 0
        self._interim = 0
        self._parts: list[bytes] | None = None
        self._kept = 0  # bytes in _parts
        self._max_body = 0
        self._too_large = False
        self._framed = False  # the answer has a Content-Length or Transfer-Encoding
        self._got_bytes = False
        self._complete = False  # the answer to _request is complete (released after feed_data)
        self._stray = False  # bytes beyond that answer: the connection cannot be reused
        self._keep = False  # the answer allows keep-alive (llhttp knows it only in its callbacks)
        self._head_bytes = 0
        self._retry_after = b""
        self._keep_alive = b""  # the answer's Keep-Alive header (its timeout), if any
        self._reused = False
        self._aborted = False
        self.opening: asyncio.Task[None] | None = None  # the connect while it runs (set by the pool)
        self.expires_at = 0.0  # loop time from which it is not reused any more (set when it goes idle)
        self.state: _State | None = None
        self._become(_CONNECTING)

    def _become(self, new: _State) -> None:
        old = self.state
        if old is new or old is _CLOSED:
            return
        self.state = new
        self._owner.connection_changed(self, old, new)

    @property
    def request(self) -> _Request | None:
        """The request on it (ACTIVE), if any."""
        return self._request

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._request is None:  # unasked: a stray answer, or garbage; never reuse it
            self._drop()
            return
        self._got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(ProtocolError("unexpected protocol upgrade"))
            return
        except httptools.HttpParserError as exc:  # a callback's exception comes wrapped in one
            if self._too_large:  # the status stands; the rest of the body is not worth reading
                request, self._request = self._request, None
                self._drop()
                if request is not None:
                    request.finish(self._status, None, None,
                                   _seconds(self._retry_after) if self._retry_after else 0.0)
                return
            if not self._complete:
                self._fail(ProtocolError(f"invalid HTTP answer: {exc}"))
                return
            # Bytes beyond a complete answer (a stray one, _Stray): the answer stands, the
            # connection goes (the server and we disagree on framing).
            self._stray = True
        if self._complete:
            self._release()
        elif not self._status:  # all of it was head (1xx included): bounded, as http.client's
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD:
                self._fail(ProtocolError(f"answer head longer than {MAX_HEAD} bytes"))

    def connection_lost(self, exc: Exception | None) -> None:
        request, self._request = self._request, None
        self._become(_CLOSED)  # first: its slot goes to the requests waiting for one
        if request is not None and not request.finished:
            self._settle(request, exc)

    def _settle(self, request: _Request, exc: Exception | None) -> None:
        """The connection closed with ``request`` on it."""
        if self._status and not self._framed and not self._interim:  # read until close: done
            request.finish(self._status, self._body(), None)
        elif not self._got_bytes and self._reused and request.attempts == 1 and not self._aborted:
            self._owner.resend(request)  # the server closed the idle connection as we sent
        elif self._aborted:
            request.finish(0, None, Aborted("the connection was aborted"))
        elif self._got_bytes:
            request.finish(0, None, ProtocolError("the server closed the connection in the middle of an answer"))
        else:
            request.finish(0, None, exc or ConnectionResetError("the server closed the connection without answering"))

    # -- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:
            raise _Stray  # a second answer in the same bytes

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name)  # lengths first: most headers are none of these, and cheaply so
        if size in (14, 17) and name.lower() in (b"content-length", b"transfer-encoding"):
            self._framed = True
        elif size == 11 and name.lower() == b"retry-after":
            self._retry_after = value
        elif size == 10 and name.lower() == b"keep-alive":
            self._keep_alive = value

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            if status == 101:
                raise httptools.HttpParserUpgrade("101")
            self._interim += 1
            if self._interim > MAX_INTERIM:
                raise httptools.HttpParserError(f"more than {MAX_INTERIM} interim (1xx) answers")
            self._framed, self._retry_after, self._keep_alive = False, b"", b""  # not the answer's
            return
        self._interim = 0
        self._status = status

    def on_body(self, body: bytes) -> None:
        if self._parts is not None:
            self._kept += len(body)
            if self._kept > self._max_body:
                self._parts, self._too_large = None, True
                raise _TooLarge
            self._parts.append(body)

    def on_message_complete(self) -> None:
        if self._interim or self._complete:
            return  # a 1xx answer: the final one follows; or a stray one (flagged already)
        self._complete = True
        self._keep = self._parser.should_keep_alive()

    # -- what the pool asks of it --------------------------------------------------------------

    def ready(self) -> None:
        """The connect succeeded: IDLE (unless it was closed or aborted meanwhile)."""
        if self.state is _CONNECTING:
            self.expires_at = self._loop.time() + self._keepalive_expiry
            self._become(_IDLE)

    def connect_failed(self) -> None:
        self._become(_CLOSED)

    def send(self, request: _Request) -> None:
        request.attempts += 1
        self._request = request
        self._status = self._interim = self._head_bytes = 0
        self._framed = self._got_bytes = self._complete = self._stray = False
        self._retry_after = self._keep_alive = b""
        self._parts = [] if request.keep_body else None
        self._kept, self._max_body, self._too_large = 0, request.max_body, False
        self._become(_ACTIVE)
        assert self._transport is not None
        self._transport.write(request.data)

    def abort(self) -> None:
        """Break it off (``HttpPool.abort``): its request fails with ``Aborted``, a connect is cancelled."""
        self._aborted = True
        if self.opening is not None:
            self.opening.cancel()
        self._drop()

    def close(self) -> None:
        """Close it when idle (expired, or the pool closes)."""
        if self._transport is not None:
            self._transport.close()
            self._become(_CLOSING)

    def expire(self, request: _Request) -> None:
        if self._request is request:
            self._fail(TimeoutError("no complete answer within the request's deadline"))

    # -- internals -----------------------------------------------------------------------------

    def _drop(self) -> None:
        """Close it at once, unread bytes and all: it is not reused."""
        if self._transport is not None:
            self._transport.abort()
            self._become(_CLOSING)

    def _body(self) -> bytes | None:
        return b"".join(self._parts) if self._parts is not None else None

    def _release(self) -> None:
        request, self._request = self._request, None
        assert request is not None
        # Read before the pool hands us the next request.
        status, body = self._status, self._body()
        retry_after = _seconds(self._retry_after) if self._retry_after else 0.0
        idle_for = self._keepalive_expiry if self._keep and not self._stray else 0.0
        if self._keep_alive:  # the server says when it closes an idle connection: sooner?
            server_timeout = _keep_alive_timeout(self._keep_alive)
            if server_timeout is not None:
                idle_for = min(idle_for, _idle_limit(server_timeout))
        if idle_for > 0:
            self._reused = True
            self.expires_at = self._loop.time() + idle_for
            self._become(_IDLE)  # the pool may hand it the next request at once
        else:
            self._drop()
        request.finish(status, body, None, retry_after)

    def _fail(self, error: BaseException) -> None:
        request, self._request = self._request, None
        self._drop()
        if request is not None:
            request.finish(0, None, error)


@mypyc_attr(native_class=False)  # compiled (setup.py), a class cannot subclass OSError
class _TunnelRefused(OSError):
    """The proxy answered CONNECT with something other than 2xx."""


def _through(proxy: Proxy | None) -> str:
    return f" through proxy {proxy}" if proxy is not None else ""


class _Tunnel(asyncio.Protocol):
    """The proxy's answer to CONNECT, read up to its blank line: ``answer`` is done when the
    tunnel is open, failed with a one-line reason when the proxy refused it or closed."""

    def __init__(self, loop: asyncio.AbstractEventLoop, proxy: Proxy, target: str) -> None:
        self.answer: asyncio.Future[None] = loop.create_future()
        self._proxy = proxy
        self._target = target  # host:port
        self._head = b""

    def data_received(self, data: bytes) -> None:
        if self.answer.done():
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > MAX_HEAD:
                self._refuse(f"an answer to CONNECT longer than {MAX_HEAD} bytes")
            return
        status_line = self._head.split(b"\r\n", 1)[0].decode("latin-1")
        version, _, rest = status_line.partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/1.") or not code.isdigit():
            self._refuse(f"not an HTTP answer to CONNECT: {status_line[:80]!r}")
        elif not 200 <= int(code) < 300:
            self._refuse(f"HTTP {code} {reason.strip()[:80]}".rstrip())
        elif end + 4 != len(self._head):  # the origin's TLS cannot have begun: we have not spoken
            self._refuse("bytes beyond its answer to CONNECT")
        else:
            self.answer.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answer.done():
            self._refuse("it closed the connection before answering CONNECT")

    def _refuse(self, why: str) -> None:
        self.answer.set_exception(_TunnelRefused(
            f"proxy {self._proxy} refused the tunnel to {self._target}: {why}"))


@dataclass(frozen=True, slots=True)
class PoolState:
    """A pool's connections by state, and its requests waiting for a connection."""

    connecting: int
    idle: int
    active: int
    closing: int
    waiting: int

    @property
    def open(self) -> int:
        """Connections that hold a slot of the pool's ``limit``."""
        return self.connecting + self.idle + self.active + self.closing


class HttpPool:
    """Keep-alive connections to one origin (at most ``limit``), requests queued beyond that.

    An idle connection is not reused after ``keepalive_expiry`` seconds (or sooner, if its
    server's ``Keep-Alive: timeout`` says so): it is closed before its server would close it.
    Used from the event loop's thread only; it binds to the running loop on first use.
    """

    def __init__(self, host: str, port: int, *, tls: bool = False, limit: int = 100,
                 connect_timeout: float = 10.0, server_hostname: str | None = None,
                 ssl_context: ssl.SSLContext | None = None,
                 keepalive_expiry: float = KEEPALIVE_EXPIRY, proxy: Proxy | None = None) -> None:
        if limit < 1:
            raise ValueError("a pool needs room for at least one connection")
        if not keepalive_expiry >= 0:
            raise ValueError("keepalive_expiry must be 0 (no reuse after idling) or more seconds")
        self.host, self.port, self.tls, self.limit = host, port, tls, limit
        self.authority = authority(host, port, tls)
        self._connect_timeout = connect_timeout
        self._server_hostname = server_hostname or host
        self._ssl_context = ssl_context
        self._keepalive_expiry = keepalive_expiry
        self.proxy = proxy
        self._loop: asyncio.AbstractEventLoop | None = None
        # The pool's state is its connections' states. Two indexes of them are kept rather than
        # counted by a scan of the connections, which would cost O(limit) per request: the idle
        # ones, in the order they went idle (a stack: the last is reused first, the first ones
        # expire; the one that leaves is nearly always the last, an O(1) pop) and the number
        # connecting. Both change in connection_changed only.
        self._connections: set[_Connection] = set()  # from the connect to connection_lost
        self._idle: list[_Connection] = []
        self._connecting = 0
        self._waiting: deque[_Request] = deque()  # never a finished request: their deadlines run
        self._sweeper: asyncio.TimerHandle | None = None
        self.aborted = False

    # -- requests ------------------------------------------------------------------------------

    def template(self, target: str, headers: Headers = ()) -> RequestTemplate:
        """A ``RequestTemplate`` for ``target`` (a path and query) on this pool's origin: in
        absolute-form, with the proxy's credentials, when an http:// origin is reached through a
        proxy (a tunnel carries the origin-form request as it is)."""
        if self.proxy is None or self.tls:
            return RequestTemplate(self.authority, target, headers)
        items = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
        return RequestTemplate(self.authority, f"http://{self.authority}{target}", [*self.proxy.headers(), *items])

    def send(self, data: bytes, done: Done, *, timeout: float, keep_body: bool = False,
             max_body: int = MAX_BODY) -> None:
        """Send one request (``RequestTemplate.build``); ``done`` is called once, from the loop,
        never from within ``send``. ``timeout`` starts now: waiting for a connection counts.
        ``keep_body``: pass the answer's body to ``done``, up to ``max_body`` bytes (past that:
        ``None``, and the connection is closed)."""
        loop = self._loop or self._bind()
        request = _Request(data, done, timeout, keep_body, max_body)
        if self.aborted:
            loop.call_soon(request.finish, 0, None, Aborted("the pool was aborted"))
            return
        now = loop.time()
        self._arm(request, now)
        self._dispatch(request, now)

    async def request(self, data: bytes, *, timeout: float, keep_body: bool = True,
                      max_body: int = MAX_BODY) -> tuple[int, bytes]:
        """``send`` as a coroutine: (status, body); raises the error (``ProtocolError`` for a
        kept body longer than ``max_body``)."""
        loop = self._loop or self._bind()
        future: asyncio.Future[tuple[int, bytes]] = loop.create_future()

        def done(status: int, retry_after: float, body: bytes | None, error: BaseException | None) -> None:
            if future.done():
                return
            if error is None and keep_body and body is None:
                error = ProtocolError(f"the answer's body is longer than {max_body} bytes")
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result((status, body or b""))

        self.send(data, done, timeout=timeout, keep_body=keep_body, max_body=max_body)
        return await future

    def shed(self, error: BaseException) -> int:
        """Fail with ``error`` every request still waiting for a connection: never written, so
        the server never saw it. Requests on connections run on. Returns how many were shed."""
        waiting = len(self._waiting)
        self._fail_waiting(error, everything=True)
        return waiting

    def abort(self) -> None:
        """Break off every request (``Aborted``) and refuse later ones; connects in flight are
        cancelled. From the loop's thread."""
        self.aborted = True
        for conn in list(self._connections):
            conn.abort()
        self._fail_waiting(Aborted("the pool was aborted"), everything=True)

    def close(self) -> None:
        """Close the idle connections (the busy ones close when their answer is in)."""
        for conn in reversed(self._idle[:]):  # from the top: each leaves the index by a pop
            conn.close()

    @property
    def connections(self) -> int:
        """Connections open, being opened, or closing: each holds a slot of ``limit``."""
        return len(self._connections)

    def state(self) -> PoolState:
        """The connections counted by state (a scan: for tests and diagnostics, not per request)."""
        counts = Counter(conn.state for conn in self._connections)
        return PoolState(connecting=counts[_CONNECTING], idle=counts[_IDLE],
                         active=counts[_ACTIVE], closing=counts[_CLOSING],
                         waiting=len(self._waiting))

    # -- what its connections tell it (_Owner) -------------------------------------------------

    def connection_changed(self, conn: _Connection, old: _State | None, new: _State) -> None:
        """The one place the indexes change; a connection that became free takes the oldest
        waiting request, a closed one's slot goes to the requests waiting."""
        if old is _IDLE:
            if self._idle[-1] is conn:
                self._idle.pop()
            else:  # closed while others went idle after it: expired, or closed by its server
                self._idle.remove(conn)
        elif old is _CONNECTING:
            self._connecting -= 1
        elif old is None:
            self._connections.add(conn)
        if new is _IDLE:
            self._idle.append(conn)
            if self._waiting:
                conn.send(self._waiting.popleft())
        elif new is _CONNECTING:
            self._connecting += 1
        elif new is _CLOSED:
            self._connections.discard(conn)
            self._refill()

    def resend(self, request: _Request) -> None:
        """Once more on another connection, ahead of the waiting ones (its deadline runs on)."""
        assert self._loop is not None
        conn = self._pick(self._loop.time())
        if conn is not None:
            conn.send(request)
            return
        self._waiting.appendleft(request)
        self._refill()

    # -- internals -----------------------------------------------------------------------------

    def _bind(self) -> asyncio.AbstractEventLoop:
        self._loop = asyncio.get_running_loop()
        return self._loop

    def _dispatch(self, request: _Request, now: float) -> None:
        conn = self._pick(now)
        if conn is not None:
            conn.send(request)
            return
        self._waiting.append(request)
        if len(self._connections) < self.limit and self._connecting < len(self._waiting):
            self._connect()

    def _pick(self, now: float) -> _Connection | None:
        """The idle connection used last, unless it expired: an expired one is closed here, never
        written to (its server may be closing it). One timestamp compared per request."""
        idle = self._idle
        while idle:
            conn = idle[-1]
            if conn.expires_at > now:
                return conn
            conn.close()  # leaves the index (CLOSING); the ones under it are older still
        return None

    def _close_expired(self, now: float) -> None:
        """Close the idle connections past their expiry, oldest first (lazily, from the sweep:
        those the requests do not need age out from the bottom of the LIFO)."""
        idle = self._idle
        while idle:
            conn = idle[0]
            if conn.expires_at > now:
                return  # mostly the earliest to expire; a later one that is not is caught by _pick
            conn.close()

    def _connect(self) -> None:
        assert self._loop is not None
        conn = _Connection(self, self._loop, self._keepalive_expiry)  # CONNECTING: counted now
        conn.opening = self._loop.create_task(self._open_connection(conn))

    async def _open_connection(self, conn: _Connection) -> None:
        assert self._loop is not None
        context = (self._ssl_context or default_context()) if self.tls else None
        proxy = self.proxy
        try:
            async with asyncio.timeout(self._connect_timeout):
                if proxy is None:
                    await self._loop.create_connection(
                        lambda: conn, self.host, self.port, ssl=context,
                        server_hostname=self._server_hostname if self.tls else None,
                    )
                elif context is None:  # absolute-form requests to the proxy
                    await self._loop.create_connection(lambda: conn, proxy.host, proxy.port)
                else:
                    await self._tunnel(conn, proxy, context)
        except (OSError, TimeoutError, ValueError) as exc:  # refused, DNS, TLS, timeout
            error = exc if isinstance(exc, OSError) else OSError(f"cannot connect: {exc}")
            if isinstance(exc, TimeoutError):
                error = TimeoutError(f"connect to {self.authority}{_through(proxy)} timed out")
            elif proxy is not None and not isinstance(exc, (_TunnelRefused, ssl.SSLError)):
                error = OSError(f"cannot connect to proxy {proxy}: {exc}")
            self._fail_waiting(error)  # before its slot frees: one attempt per waiting request
            conn.connect_failed()
            return
        except asyncio.CancelledError:
            if self.aborted:  # abort() cancelled it; no connect follows a closed slot now
                conn.connect_failed()
            # else the loop is shutting down: it stays counted, so nothing starts on it
            raise
        finally:
            conn.opening = None
        conn.ready()

    async def _tunnel(self, conn: _Connection, proxy: Proxy, context: ssl.SSLContext) -> None:
        """``CONNECT`` through ``proxy``, then TLS to the origin over the tunnel; ``conn`` gets the
        TLS transport (``start_tls`` does not call ``connection_made`` itself)."""
        assert self._loop is not None
        target = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        tunnel = _Tunnel(self._loop, proxy, target)
        transport, _ = await self._loop.create_connection(lambda: tunnel, proxy.host, proxy.port)
        try:
            transport.write(b"CONNECT %s HTTP/1.1\r\n%s\r\n" % (
                target.encode("ascii"), encode_headers([("Host", target), *proxy.headers()])))
            await tunnel.answer
            tls = await self._loop.start_tls(transport, conn, context, server_hostname=self._server_hostname)
        except BaseException:
            transport.abort()
            raise
        if tls is None:  # the transport closed under it
            raise _TunnelRefused(f"proxy {proxy} closed the tunnel to {target}")
        conn.connection_made(tls)

    def _refill(self) -> None:
        """Open a connection for the requests waiting, if they have none coming and the limit
        allows: after a connection closed (its slot is free) or a connect failed."""
        if (len(self._waiting) > self._connecting and len(self._connections) < self.limit
                and not self.aborted):
            self._connect()

    def _arm(self, request: _Request, now: float) -> None:
        """Start the request's deadline (once, in ``send``: a retry on a new connection keeps it).

        Deadlines are enforced by one sweep every ``_SWEEP`` seconds while any runs, not by a
        timer per request: a call_at and its cancel cost more than the rest of a request's
        bookkeeping. A deadline is kept to within ``_SWEEP``."""
        assert self._loop is not None
        request.deadline = now + request.timeout
        if self._sweeper is None:
            self._sweeper = self._loop.call_later(_SWEEP, self._sweep)

    def _sweep(self) -> None:
        assert self._loop is not None
        self._sweeper = None
        now = self._loop.time()
        running = False
        for conn in list(self._connections):
            request = conn.request
            if request is not None:
                if request.deadline <= now:
                    conn.expire(request)
                else:
                    running = True
        late = [request for request in self._waiting if request.deadline <= now]
        if late:  # out of the queue before their callbacks run (one may send again)
            self._waiting = deque(request for request in self._waiting if request.deadline > now)
            for request in late:
                request.finish(0, None, TimeoutError(
                    f"no connection to {self.authority} within the request's deadline"))
        self._close_expired(now)
        if (running or self._waiting) and self._sweeper is None:
            self._sweeper = self._loop.call_later(_SWEEP, self._sweep)

    def _fail_waiting(self, error: BaseException, *, everything: bool = False) -> None:
        """A connect failed: fail the oldest waiting request (``everything``: all of them)."""
        while self._waiting:
            self._waiting.popleft().finish(0, None, error)
            if not everything:
                return
