"""Receiving CloudEvents over HTTP: the parser and the small server base of the local sinks.

Used by the in-memory channel (``poller.kit.inmemory``) and the message dumper
(``poller.kit.dumper``); nothing here is on the poller's hot path.

``parse_event(headers, body)`` turns one HTTP request into an event dict with the
``cloudevents`` SDK (CloudEvents 1.0 HTTP binding; off the hot path, so the reference
implementation rather than our own):

- *structured* mode: ``Content-Type: application/cloudevents+json``; the body is the event.
- *binary* mode: a ``ce-specversion`` header; attributes are the ``ce-*`` headers (values
  percent-decoded), ``datacontenttype`` is ``Content-Type``, data is the body.
- anything else is not a CloudEvent: ``NotACloudEvent`` with a one-line reason, which the
  servers answer as 400; so is an event the SDK does not validate.

``parse_batch(body)`` reads CloudEvents' batched content mode (HTTP binding 3.3,
``application/cloudevents-batch+json``: a JSON array of structured events), each event
validated as a structured one (the SDK has no batch reader). ``batch_reply`` answers a batch
from each event's own answer: 2xx when every event was taken; when some were, 200 with the
others listed as ``batchItemFailures`` (EventBridge Pipes' shape, which the poller reads and
retries just those); when none was, the first refusal.

The dict is the event's JSON document (the JSON event format): ``data`` is the JSON value when
the content type is JSON, else the text; a body that is not UTF-8 becomes ``data_base64``.

``CloudEventServer`` is a ``ThreadingHTTPServer`` (HTTP/1.1 keep-alive, one daemon thread per
connection) with ``start()`` / ``serve_forever()`` / ``stop()`` and a context manager;
subclasses implement ``handle(headers, body) -> Reply``. Neither server keeps anything across
restarts: everything lives in memory.

Limits (``ServerOptions``), so that no client can hold the server's threads or memory:

- ``max_body``: a larger body is answered 413. Chunked bodies are counted as they come; chunk
  sizes must be plain hex (``int(x, 16)`` alone would take ``-1``, and reading -1 bytes is
  reading to EOF, past the limit).
- ``request_timeout``: from its first byte, a whole request (line, headers, body) must arrive
  within this; a socket timeout alone restarts with every byte, so a client trickling a request
  would hold a thread forever. Late: ``408`` and the connection is closed.
- ``idle_timeout``: a keep-alive connection waiting for its next request is closed after this.
- ``max_connections``: at most this many connections (threads) at once. One more is refused
  at once rather than made to wait: the accepting thread answers ``503`` with ``Retry-After``
  and ``Connection: close`` without reading the request, and closes it (a client that had already
  sent its request may see a reset instead). Both are retried by the poller. Waiting instead
  would block the accepting thread, or queue connections without bound.
"""

from __future__ import annotations

import abc
import io
import logging
import re
import signal
import socket
import socketserver
import ssl
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Generic, Self, TypeVar

import orjson
from cloudevents.core.bindings.http import HTTPMessage, from_binary, from_structured
from cloudevents.core.exceptions import CloudEventValidationError
from cloudevents.core.formats.json import JSONFormat

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

C = TypeVar("C", bound="DataclassInstance")  # Tally's counts: replaced with dataclasses.replace

__all__ = [
    "BATCH_CONTENT_TYPE",
    "STRUCTURED_CONTENT_TYPE",
    "CloudEventServer",
    "NotACloudEvent",
    "Reply",
    "ServerOptions",
    "Tally",
    "batch_reply",
    "is_batch",
    "parse_batch",
    "parse_event",
    "run_until_signalled",
]

log = logging.getLogger(__name__)

STRUCTURED_CONTENT_TYPE = "application/cloudevents+json"
BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"
_FORMAT = JSONFormat()
_REQUIRED = ("specversion", "id", "source", "type")
# A chunk size is hex digits and nothing else: no sign, no "0x", no "_" (all of which int() takes).
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
MAX_TRAILERS = 100  # trailer lines of a chunked request


class NotACloudEvent(ValueError):
    """The request is not a (supported) CloudEvent; ``str()`` is a one-line reason for a 400."""


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def parse_event(headers: Mapping[str, str], body: bytes, *, decode_data: bool = True) -> dict[str, Any]:
    """Turn one HTTP request (header names lower-cased) into an event dict: the event's JSON
    document (the JSON event format), parsed and validated by the ``cloudevents`` SDK.

    With ``decode_data=False`` the dict has the attributes only (no ``data``), for the channel,
    which forwards the body untouched anyway. Raises ``NotACloudEvent``.
    """
    media = media_type(headers.get("content-type"))
    if media.startswith("application/cloudevents"):
        if media == "application/cloudevents-batch+json":
            raise NotACloudEvent("a batch (batched content mode) holds several events: read it with parse_batch")
        if media != STRUCTURED_CONTENT_TYPE:
            raise NotACloudEvent(f"unsupported event format {media!r}; use {STRUCTURED_CONTENT_TYPE}")
        sent = _structured_attributes(body)
        parse = from_structured
    elif "ce-specversion" in headers:
        sent = {name[3:] for name in headers if name.startswith("ce-")}
        parse = from_binary
        if not decode_data:
            body = b""  # the attributes are all in the headers: the data need not be decoded
    else:
        raise NotACloudEvent(
            f"not a CloudEvent: no ce-specversion header and content type is not {STRUCTURED_CONTENT_TYPE}"
        )
    # The SDK fills a missing id (a UUID) and time ("now"): a sink must see what was sent.
    missing = [name for name in _REQUIRED if name not in sent]
    if missing:
        raise NotACloudEvent(f"missing required attribute(s): {', '.join(missing)}")
    try:
        event = parse(HTTPMessage(dict(headers), body), _FORMAT)
        document: dict[str, Any] = orjson.loads(_FORMAT.write(event))
    except CloudEventValidationError as exc:
        raise NotACloudEvent(_validation_reason(exc)) from None
    except (ValueError, TypeError, KeyError, AttributeError) as exc:  # the SDK's JSON and time parsing
        raise NotACloudEvent(f"not a valid CloudEvent: {_one_line(exc)}") from None
    if "time" not in sent:
        document.pop("time", None)
    if not decode_data:  # structured: the data came with the attributes
        document.pop("data", None)
        document.pop("data_base64", None)
    return document


def is_batch(headers: Mapping[str, str]) -> bool:
    """The request is in batched content mode (header names lower-cased)."""
    return media_type(headers.get("content-type")) == BATCH_CONTENT_TYPE


def parse_batch(body: bytes) -> list[tuple[dict[str, Any], bytes]]:
    """A batched-mode body as (event, the event's own structured JSON) pairs; ``NotACloudEvent``
    if it is not a JSON array of valid events (a batch is taken whole or refused whole)."""
    try:
        documents = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise NotACloudEvent(f"batch is not valid JSON: {exc}") from None
    if not isinstance(documents, list):
        raise NotACloudEvent("a batch must be a JSON array of events")
    if not documents:
        raise NotACloudEvent("an empty batch holds no event")
    events = []
    for i, document in enumerate(documents):
        encoded = orjson.dumps(document)
        try:
            event = parse_event({"content-type": STRUCTURED_CONTENT_TYPE}, encoded)
        except NotACloudEvent as exc:
            raise NotACloudEvent(f"event {i} of the batch: {exc}") from None
        events.append((event, encoded))
    return events


def batch_reply(results: list[tuple[str, Reply]]) -> Reply:
    """The answer to a batch, from (event id, that event's answer) in batch order."""
    failed = [event_id for event_id, reply in results if not 200 <= reply.status < 300]
    if not failed:
        return Reply(202)
    if len(failed) == len(results):
        return next(reply for _, reply in results)
    return Reply(200, content=orjson.dumps({"batchItemFailures": [{"itemIdentifier": i} for i in failed]}),
                 content_type="application/json")


def _structured_attributes(body: bytes) -> set[str]:
    try:
        event = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise NotACloudEvent(f"structured event is not valid JSON: {exc}") from None
    if not isinstance(event, dict):
        raise NotACloudEvent("structured event must be a JSON object")
    return set(event)


def _validation_reason(exc: CloudEventValidationError) -> str:
    """The SDK's errors, one line: ``source: Missing required attribute: 'source'; ...``."""
    reasons = [f"{name}: {errors[0]}" for name, errors in exc.errors.items() if errors]
    return _one_line("; ".join(reasons) or str(exc))


def _one_line(exc: object) -> str:
    return " ".join(str(exc).split())[:300]


# --------------------------------------------------------------------------------------------
# Server


class Tally(Generic[C]):
    """Counts kept as a frozen dataclass, replaced under a lock: readers get a consistent snapshot."""

    def __init__(self, initial: C) -> None:
        self._lock = threading.Lock()
        self._value = initial

    @property
    def value(self) -> C:
        return self._value

    def add(self, **deltas: int) -> None:
        with self._lock:
            current = self._value
            self._value = replace(current, **{k: getattr(current, k) + n for k, n in deltas.items()})


@dataclass(frozen=True, slots=True)
class Reply:
    """What a server answers to one request: a status and a one-line reason (the body), or
    ``content`` of ``content_type`` instead."""

    status: int
    reason: str = ""
    content: bytes = b""
    content_type: str = "text/plain; charset=utf-8"


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerOptions:
    """HTTP-level limits shared by the local servers."""

    max_body: int = 16 * 1024 * 1024  # SQS messages are <= 1 MiB; this is generous
    idle_timeout: float | None = 300.0  # close keep-alive connections idle this long (None: never)
    # From a request's first byte, how long the whole of it (line, headers, body) may take to
    # arrive (None: no limit); late: 408, and the connection is closed.
    request_timeout: float | None = 60.0
    # Connections (each a thread) at once; one more is answered 503 and closed at once. Above
    # what a poller fleet keeps open (processes x --http-concurrency, kept alive).
    max_connections: int = 1024
    stop_grace: float = 5.0  # on stop, how long requests in progress may finish
    # Serve HTTPS with this server-side context (its handshake runs in the connection's thread).
    tls: ssl.SSLContext | None = None

    def __post_init__(self) -> None:
        if self.max_body <= 0:
            raise ValueError("max_body must be positive")
        if self.idle_timeout is not None and self.idle_timeout <= 0:
            raise ValueError("idle_timeout must be positive or None")
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise ValueError("request_timeout must be positive or None")
        if self.max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        if self.stop_grace < 0:
            raise ValueError("stop_grace must be >= 0")


class _BodyError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _RequestInput(io.RawIOBase):
    """A handler's socket input, with a deadline per request.

    A socket timeout bounds one recv and restarts with every byte: a client sending a byte now
    and then would hold the handler's thread forever. While a deadline runs, each recv gets only
    the time left; without one (between requests) the idle timeout applies.
    """

    def __init__(self, sock: socket.socket, idle_timeout: float | None) -> None:
        super().__init__()
        self._sock = sock
        self._idle_timeout = idle_timeout
        self._deadline: float | None = None
        self.expired = False  # the deadline passed: the request did not arrive in time

    def readable(self) -> bool:
        return True

    def start_deadline(self, seconds: float | None) -> None:
        self._deadline = None if seconds is None else time.monotonic() + seconds

    def stop_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline = None
            self._sock.settimeout(self._idle_timeout)  # writes use the socket's timeout too

    def readinto(self, buffer: Any) -> int:
        if self._deadline is not None:
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                self.expired = True
                raise TimeoutError("the request did not arrive in time")
            self._sock.settimeout(remaining)
        try:
            return self._sock.recv_into(buffer)
        except TimeoutError:
            self.expired = self._deadline is not None
            raise


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the poller keeps pooled connections open
    server_version = "sqs-poller-local"
    disable_nagle_algorithm = True  # headers and body are two writes; avoid 40 ms delayed-ACK stalls
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        idle_timeout = self.server.options.idle_timeout
        if idle_timeout is not None:
            self.connection.settimeout(idle_timeout)
        self.rfile.close()  # the stdlib's socket file: replaced by one that keeps a deadline
        self._input = _RequestInput(self.connection, idle_timeout)
        self._reader = io.BufferedReader(self._input)
        self.rfile = self._reader

    def handle_one_request(self) -> None:
        # An idle keep-alive connection waits up to idle_timeout for a request; from the
        # request's first byte on, all of it must arrive within request_timeout.
        try:
            if not self._reader.peek(1):
                self.close_connection = True  # the client closed it
                return
        except TimeoutError:
            self.close_connection = True  # idle too long
            return
        self._input.start_deadline(self.server.options.request_timeout)
        try:
            super().handle_one_request()  # a TimeoutError closes the connection in there
        finally:
            self._input.stop_deadline()
        if self._input.expired:
            self._request_timed_out()

    def _request_timed_out(self) -> None:
        """408 (nothing was answered yet: the deadline only runs while reading), then close."""
        self.close_connection = True
        body = b"the request did not arrive in time\n"
        try:
            self.connection.settimeout(1.0)  # a client that does not read is not waited for
            self.connection.sendall(
                b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain; charset=utf-8\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        except OSError:
            pass

    def do_POST(self) -> None:
        server = self.server
        with server.busy_lock:
            server.busy += 1
        try:
            if server.stopping:
                self._answer(Reply(503, "shutting down"), close=True)
                return
            try:
                body = self._read_body()
            except _BodyError as exc:
                # The rest of the body was not read: the connection cannot be reused.
                self._answer(Reply(exc.status, exc.reason), close=True)
                return
            finally:
                self._input.stop_deadline()  # the request is in: the app's time is not the client's
            headers = {name.lower(): value for name, value in self.headers.items()}
            try:
                reply = server.app.handle(headers, body)
            except Exception:
                log.exception("%s: error handling a request", type(server.app).__name__)
                reply = Reply(500, "internal error")
            self._answer(reply)
        finally:
            with server.busy_lock:
                server.busy -= 1

    def _method_not_allowed(self) -> None:
        self._answer(Reply(405, "only POST is accepted"), extra={"Allow": "POST"})

    do_GET = do_PUT = do_DELETE = do_PATCH = _method_not_allowed  # noqa: N815 - http.server's names

    def do_HEAD(self) -> None:
        self.send_response(405)
        self.send_header("Allow", "POST")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _read_body(self) -> bytes:
        limit = self.server.options.max_body
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked(limit)
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            return b""  # HTTP/1.1: no Content-Length and not chunked means no body
        try:
            length = int(length_header)
            if length < 0:
                raise ValueError
        except ValueError:
            raise _BodyError(400, f"invalid Content-Length {length_header!r}") from None
        if length > limit:
            raise _BodyError(413, f"body of {length} bytes exceeds the limit of {limit}")
        body = self.rfile.read(length)
        if len(body) != length:
            raise _BodyError(400, "body shorter than Content-Length")
        return body

    def _read_chunked(self, limit: int) -> bytes:
        parts: list[bytes] = []
        size = 0
        while True:
            line = self.rfile.readline(1024)
            size_text = line.split(b";", 1)[0].strip()
            if not line.endswith(b"\n") or not _CHUNK_SIZE.fullmatch(size_text):
                raise _BodyError(400, f"malformed chunked body: bad chunk size line {line[:40]!r}")
            chunk = int(size_text, 16)
            if chunk == 0:
                self._skip_trailers()
                return b"".join(parts)
            size += chunk
            if size > limit:
                raise _BodyError(413, f"body exceeds the limit of {limit} bytes")
            data = self.rfile.read(chunk)
            if len(data) != chunk or self.rfile.readline(3) not in (b"\r\n", b"\n"):
                raise _BodyError(400, "malformed chunked body: a chunk shorter than its size, "
                                      "or not followed by CRLF")
            parts.append(data)

    def _skip_trailers(self) -> None:
        for _ in range(MAX_TRAILERS + 1):
            line = self.rfile.readline(65537)
            if line in (b"\r\n", b"\n"):
                return
            if not line.endswith(b"\n"):
                raise _BodyError(400, "malformed chunked body: trailer line too long, or cut off")
        raise _BodyError(400, f"more than {MAX_TRAILERS} trailer lines")

    def _answer(self, reply: Reply, *, close: bool = False, extra: Mapping[str, str] | None = None) -> None:
        body = reply.content or ((reply.reason + "\n").encode() if reply.reason else b"")
        self.send_response(reply.status)
        if body:
            self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        # The stdlib writes every request to stderr; one line per request is noise here.
        log.debug("%s %s", self.address_string(), format % args)


_BUSY = b"too many connections\n"
_TOO_MANY_CONNECTIONS = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
                         b"Content-Length: %d\r\nRetry-After: 1\r\nConnection: close\r\n\r\n%s" % (len(_BUSY), _BUSY))


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a stuck connection never keeps the process alive
    allow_reuse_address = True
    # socketserver's default backlog is 5: a burst of new connections (a poller opening its
    # pool) overflows it, and a dropped SYN is retried by the client's kernel only after 1 s, 3 s.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], app: CloudEventServer, options: ServerOptions) -> None:
        self.app = app
        self.options = options
        self.stopping = False
        self.busy = 0
        self.busy_lock = threading.Lock()
        self.connections: set[socket.socket] = set()  # admitted, each with its thread
        self.connections_lock = threading.Lock()
        self.refused = 0  # connections refused for max_connections
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup (getfqdn) that can take seconds.
        socketserver.TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        if self.options.tls is not None:  # not here: the accepting thread must never wait on a client
            sock = self.options.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The stdlib prints a traceback to stderr; a client that went away, or that refused the
        # server's certificate, is routine here.
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError, ssl.SSLError)) or self.stopping:
            log.debug("connection from %s ended: %r", client_address, exc)
        else:
            log.exception("error serving %s", client_address)  # noqa: LOG004 - socketserver calls this in its except

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            admitted = len(self.connections) < self.options.max_connections
            if admitted:
                self.connections.add(request)  # so that stop() can close idle keep-alive connections
        if admitted:
            super().process_request(request, client_address)  # a thread for it
        else:
            self._refuse(request, client_address)

    def _refuse(self, request: socket.socket, client_address: Any) -> None:
        """Beyond max_connections: 503 at once, from this (the accepting) thread, without reading
        the request or starting a thread; the client retries later."""
        self.refused += 1
        if self.refused == 1 or self.refused % 1000 == 0:
            log.warning("%d connection(s) refused so far: %d open, the limit (max_connections)",
                        self.refused, self.options.max_connections)
        log.debug("refused a connection from %s: at max_connections", client_address)
        try:
            request.setblocking(False)  # never wait on a client here: accepting would stop
            request.send(_TOO_MANY_CONNECTIONS)
        except OSError:
            pass
        self.shutdown_request(request)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class CloudEventServer(abc.ABC):
    """Base of the local HTTP servers: binds in the constructor (port 0 picks a free port).

    ``start()`` serves from a daemon thread; ``serve_forever()`` serves from the caller's thread;
    ``stop()`` stops accepting, lets requests in progress finish (``stop_grace``), then closes
    every connection. Keeps nothing across restarts.
    """

    def __init__(self, host: str, port: int, *, server_options: ServerOptions | None = None) -> None:
        self.server_options = server_options or ServerOptions()
        server_class = _HTTPServer6 if ":" in host else _HTTPServer
        self._httpd = server_class((host, port), self, self.server_options)
        self._thread: threading.Thread | None = None
        self._serving_ident: int | None = None
        self._serve_called = False
        self._stopped = False
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = str(self._httpd.server_address[0])
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"  # a URL a local client can use
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        scheme = "https" if self.server_options.tls is not None else "http"
        return f"{scheme}://{host}:{self.port}/"

    @abc.abstractmethod
    def handle(self, headers: dict[str, str], body: bytes) -> Reply:
        """Answer one POST (header names lower-cased). Called from many threads at once."""

    def start(self) -> Self:
        with self._lock:
            if self._serve_called:
                raise RuntimeError("server already started")
            self._serve_called = True
        self._thread = threading.Thread(
            target=self._serve, name=f"{type(self).__name__}:{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve from this thread until ``stop()`` is called from another thread."""
        with self._lock:
            if self._serve_called:
                raise RuntimeError("server already started")
            self._serve_called = True
        self._serve()

    def _serve(self) -> None:
        self._serving_ident = threading.get_ident()
        self._httpd.serve_forever(poll_interval=0.2)

    @property
    def serving(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Stop serving and close all connections; idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        httpd = self._httpd
        httpd.stopping = True
        if self._serve_called:
            if threading.get_ident() == self._serving_ident:
                # shutdown() waits for serve_forever() to return: from its own thread it would
                # deadlock, so only ask for it here.
                threading.Thread(target=httpd.shutdown, daemon=True).start()
            else:
                httpd.shutdown()
        httpd.server_close()
        deadline = time.monotonic() + self.server_options.stop_grace
        while httpd.busy and time.monotonic() < deadline:
            time.sleep(0.02)
        with httpd.connections_lock:
            connections = list(httpd.connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # wakes the handler thread blocked in recv()
            except OSError:
                pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self.close()

    def close(self) -> None:
        """Release what the subclass holds (pools, threads); called once by ``stop()``."""

    def __enter__(self) -> Self:
        if not self._serve_called:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def run_until_signalled(server: CloudEventServer, started: str, stopped: Callable[[], str]) -> None:
    """Serve until SIGTERM, SIGINT or the server dies, then stop cleanly.

    ``started`` is logged once serving; ``stopped()`` gives the line logged after the stop.
    The signal handlers only set an event: the stop runs in this (the main) thread, never in a
    handler and never in the serving thread. SIGINT too: a KeyboardInterrupt raised wherever the
    main thread happens to be (inside a lock of logging or of the event itself) can hang the stop.
    """
    stop_requested = threading.Event()
    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, lambda signum, frame: stop_requested.set())
    try:
        server.start()
        log.info("%s", started)
        # A timed wait, so that a dead server is noticed.
        while not stop_requested.wait(0.5):
            if not server.serving:
                raise RuntimeError(f"{type(server).__name__}: server thread ended unexpectedly")
    finally:
        server.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    log.info("%s", stopped())
