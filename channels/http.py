"""The HTTP channel: each message as a CloudEvent POSTed to a sink (Knative's ``K_SINK``).

``concurrency`` sender threads, each with its own keep-alive connection, take work from one
queue, so several requests are in flight. A unit of work is what the worker publishes together:
one message on a standard queue, the messages of one FIFO group, in order, on a FIFO queue. A
group is sent one message at a time, and once one of its messages is not delivered the rest is
reported RETRY without being sent, so nothing is acknowledged ahead of an earlier message.

One attempt per message: the worker owns retries and their backoff. Outcomes: 2xx -> ACK; 408,
425, 429, 5xx, timeouts and connection errors -> RETRY; any other status (400, 413, redirects,
...) -> REJECT; a message that cannot be made an event -> REJECT. ``timeout`` bounds the whole
request (connect, send, the full answer), so a sink trickling its answer cannot hold a sender.

Credentials in the sink URL (``https://user:password@host/``) are sent as HTTP Basic auth, as
curl, requests and httpx do, and never appear in logs or reasons: those show ``redact(sink)``.

The connection is ``channels.wire``, not requests, urllib3 or ``http.client``: measured here, one
POST to a local sink costs ~400 us of client CPU with requests, ~145 us with urllib3, 130-170 us
with http.client and ~25 us with ``channels.wire``, and this is the hot path. The headers that
are the same for every message (``Host``, ``User-Agent``, ``Authorization``, ``ce-specversion``,
``ce-source``, ``ce-type``, overrides; ``Content-Type`` in structured mode) are encoded once per
connection.
"""

from __future__ import annotations

import base64
import logging
import queue
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from channels.base import Channel, Message, Outcome, Report
from channels.events import EventError, EventFormat, is_extension_name
from channels.wire import Headers, HttpConnection

__all__ = ["HttpChannel", "HttpConfig", "check_url", "redact"]

MODES = ("binary", "structured")
_RETRY_STATUSES = frozenset({408, 425, 429})
_STRUCTURED = "application/cloudevents+json; charset=utf-8"
_USER_AGENT = "sqs-poller"
_STOP = object()
_PRINTABLE = re.compile(r"[\x21-\x7e]*")
# A sender stuck this long past its request deadline counts as stalled (see Channel.stalled).
_STALL_GRACE = 10.0

log = logging.getLogger(__name__)


def check_url(url: str, what: str = "sink") -> None:
    """A one-line ValueError unless ``url`` is an absolute http(s) URL with a host."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ValueError(f"{what} URL {redact(url)!r} is malformed: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{what} URL {redact(url)!r} must be an absolute http:// or https:// URL")
    if not _PRINTABLE.fullmatch(parts.path + parts.query):
        raise ValueError(f"{what} URL {redact(url)!r}: spaces and non-ASCII in the path must be percent-encoded")


def redact(url: str) -> str:
    """The URL as logs may show it: no ``user:password@``, and the query's values replaced
    (tokens often travel there)."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc.rpartition("@")[2]
        query = urlencode([(k, "***") for k, _ in parse_qsl(parts.query, keep_blank_values=True)], safe="*")
        if parts.query and not query:
            query = "***"
        return urlunsplit(parts._replace(netloc=netloc, query=query))
    except ValueError:
        return "<an unparsable URL>"


def basic_auth(url: str) -> str | None:
    """``Authorization`` value for the URL's userinfo (percent-decoded), or None without one."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return None
    userinfo = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
    return "Basic " + base64.b64encode(userinfo.encode()).decode("ascii")


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpConfig:
    name: ClassVar[str] = "http"

    sink: str = field(repr=False)  # may carry credentials
    mode: str = "binary"
    data_mode: str = "message"
    overrides: Mapping[str, str] = field(default_factory=dict)
    # Few threads: measured here, 2-4 senders per process cost half the CPU per message of 16
    # (GIL hand-offs) on a local sink; raise it for a distant sink with high latency.
    concurrency: int = 4
    timeout: float = 30.0  # the whole request: connect, send, the full answer

    def __post_init__(self) -> None:
        check_url(self.sink)
        if self.mode not in MODES:
            raise ValueError(f"HTTP mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        EventFormat(source="", data_mode=self.data_mode)  # validates data_mode
        for name in self.overrides:  # they become header names
            if not is_extension_name(name):
                raise ValueError(f"override {name!r} is not a valid CloudEvents extension name")
        if not 1 <= self.concurrency <= 1024:
            raise ValueError(f"--http-concurrency must be between 1 and 1024, not {self.concurrency}")
        if not 0 < self.timeout <= 3600:
            raise ValueError(f"--http-timeout must be above 0 and at most 3600, not {self.timeout}")

    def create(self, source: str) -> HttpChannel:
        return HttpChannel(self, source)


class _Connection:
    """One keep-alive connection to the sink, reopened when it breaks. One per sender thread."""

    def __init__(self, config: HttpConfig, headers: Headers) -> None:
        url = urlsplit(config.sink)
        https = url.scheme == "https"
        self.target = (url.path or "/") + (f"?{url.query}" if url.query else "")
        self._conn = HttpConnection(url.hostname or "", url.port or (443 if https else 80), tls=https,
                                    timeout=config.timeout, headers=headers)

    def post(self, body: bytes, headers: Headers) -> int:
        """POST and return the status. OSError (TimeoutError, ``wire.ProtocolError``, ...) on
        transport errors; ValueError if the headers cannot be sent (nothing was)."""
        return self._conn.post(self.target, headers, body)

    def abort(self) -> None:
        """Break off a request in progress (from another thread) and refuse later ones."""
        self._conn.abort()

    def close(self) -> None:
        self._conn.close()


class HttpChannel(Channel):
    def __init__(self, config: HttpConfig, source: str) -> None:
        self.config = config
        self._format = EventFormat(source=source, data_mode=config.data_mode, overrides=config.overrides)
        self._binary = config.mode == "binary"
        # Sent with every request, encoded once per connection.
        self._headers: dict[str, str] = {"User-Agent": _USER_AGENT}
        auth = basic_auth(config.sink)
        if auth is not None:
            self._headers["Authorization"] = auth
        self._headers.update(self._format.http_binary_constant() if self._binary
                             else {"Content-Type": _STRUCTURED})
        self._sink = redact(config.sink)
        self._work: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._abandon = threading.Event()  # set when close() runs out of time
        self._connections: list[_Connection] = []
        # Per sender: when its request in progress started (0.0 while idle); for stalled().
        self._busy_since = [0.0] * config.concurrency
        self._threads = [
            threading.Thread(target=self._send_loop, args=(i,), name=f"http-{i}", daemon=True)
            for i in range(config.concurrency)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def publish(self, batch: Sequence[Message], report: Report) -> None:
        groups: dict[str, list[Message]] = {}
        for message in batch:
            group = message.group_id
            if group is None:
                self._work.put(([message], report))
            else:
                groups.setdefault(group, []).append(message)
        for unit in groups.values():
            self._work.put((unit, report))

    def close(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        self._work.put(_STOP)
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if any(thread.is_alive() for thread in self._threads):
            # Out of time: break off the requests in progress (they report RETRY) and give back
            # what is left. A sender that still does not return in a moment is left behind.
            self._abandon.set()
            for conn in list(self._connections):
                conn.abort()
            grace = time.monotonic() + 0.5
            for thread in self._threads:
                thread.join(max(0.0, grace - time.monotonic()))
        while True:  # units nobody took (no thread started, or all stuck)
            try:
                item = self._work.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                unit, report = item  # type: ignore[misc]
                for message in unit:
                    report(message, Outcome.RETRY, "channel closed before delivery")

    def stalled(self) -> str | None:
        now = time.monotonic()
        limit = self.config.timeout + _STALL_GRACE
        for i, since in enumerate(self._busy_since):
            if since and now - since > limit:
                return f"http sender {i} has been in one request for {now - since:.0f}s (--http-timeout {self.config.timeout:g}s)"
        return None

    def _send_loop(self, index: int) -> None:
        conn = _Connection(self.config, self._headers)
        self._connections.append(conn)
        try:
            while True:
                item = self._work.get()
                if item is _STOP:
                    self._work.put(_STOP)
                    return
                unit, report = item  # type: ignore[misc]
                self._busy_since[index] = time.monotonic()
                try:
                    self._send_unit(conn, unit, report)
                finally:
                    self._busy_since[index] = 0.0
        finally:
            conn.close()

    def _send_unit(self, conn: _Connection, unit: list[Message], report: Report) -> None:
        for i, message in enumerate(unit):
            if self._abandon.is_set():
                outcome, reason = Outcome.RETRY, "channel closed before delivery"
            else:
                outcome, reason = self._deliver(conn, message)
            report(message, outcome, reason)
            if outcome is not Outcome.ACK:
                for later in unit[i + 1:]:
                    report(later, Outcome.RETRY, f"an earlier message of group {later.group_id} "
                                                 "was not delivered")
                return

    def _deliver(self, conn: _Connection, message: Message) -> tuple[Outcome, str]:
        headers: list[tuple[str, str]]
        try:
            if self._binary:
                headers, body = self._format.http_binary_message(message)
            else:
                body, headers = self._format.structured(message), []
        except (EventError, TypeError, ValueError) as exc:
            return Outcome.REJECT, f"cannot make a CloudEvent: {exc}"
        try:
            status = conn.post(body, headers)
        except OSError as exc:  # before ValueError: ssl.SSLCertVerificationError is both
            return Outcome.RETRY, f"sink {self._sink}: {type(exc).__name__}: {exc}"
        except ValueError as exc:  # the event cannot be put in a request (CR/LF in a header...)
            return Outcome.REJECT, f"cannot send the CloudEvent: {exc}"
        except Exception as exc:  # never let a sender thread die with a message unreported
            log.error("unexpected error sending message %s: %s: %s", message.id, type(exc).__name__, exc)
            conn.close()
            return Outcome.RETRY, f"unexpected {type(exc).__name__}: {exc}"
        if 200 <= status < 300:
            return Outcome.ACK, ""
        reason = f"sink {self._sink} answered HTTP {status}"
        if status < 500 and status not in _RETRY_STATUSES:
            return Outcome.REJECT, reason
        return Outcome.RETRY, reason
