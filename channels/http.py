"""The HTTP channel: each message as a CloudEvent POSTed to a sink (Knative's ``K_SINK``).

It lives on the worker's event loop: ``publish`` writes each request at once on one of up to
``concurrency`` keep-alive connections (``channels.transport.http``; the rest wait for a free
one) and every answer is a callback that reports the message. Hundreds of requests in flight
cost no more CPU per message than a few: no thread per request, no task per request.

One attempt per message: the worker owns retries, their backoff and FIFO order (it hands over a
group's messages one at a time). ``timeout`` bounds the whole attempt, from ``publish`` (waiting
for a free connection included) to the last byte of the answer, so neither a sink trickling its
answer nor a queue behind a slow sink can hold a message past it, and a request whose attempt
ran out is never sent late.

What an answer means (``outcome_of``) follows Knative's data-plane contract
(https://github.com/knative/specs/blob/main/specs/eventing/data-plane.md, "Event Acknowledgement
and Delivery Retry"), where "not retried" would mean the queue's DLQ for us:

- 2xx: ACK.
- 400, 413, 415, 422, 431: the sink refuses this one event (unparsable, too large, a type or
  content it cannot take, headers too large): REJECT, left to the queue's redrive policy. But
  a refusal is held (``_Refusals``) until the sink shows it works (a 2xx), for at most the
  attempt's deadline; when ``REFUSAL_RUN`` different events in a row get the same refusal, it
  is the sink's problem, not theirs (a sink that answers 400 to everything), and they and the
  next ones with that answer are RETRY until a 2xx: the worker's circuit pauses receiving.
- 401, 403, 407: the sink refuses our credentials: RETRY (logged once), never a per-message
  reject: a rotated token must not send a backlog to the DLQ.
- everything else (3xx, 404 and 409 as Knative says, 408, 429, 5xx, other 4xx, timeouts,
  connection errors): RETRY, with the answer's ``Retry-After`` if any. Knative does not retry
  "other 4xx", but those are about the endpoint (405, 410, 414, ...), not the event; and its
  rule for codes it does not list is to retry.

Modes: ``binary`` and ``structured`` send one event per request; ``batch`` (CloudEvents' batched
content mode, ``application/cloudevents-batch+json``) sends up to ``batch_size`` events in one
JSON array, gathered for at most a few milliseconds. A batch's status applies to each of its
events, unless a 2xx answer lists ``batchItemFailures`` as EventBridge Pipes does
(``{"batchItemFailures": [{"itemIdentifier": "<event id>"}]}``): those events are retried, the
others acked. A batch refused with a refusal status is split in halves, sent again, down to the
one event the sink refuses alone: a sink's size limit must not reject events that fit alone.
A 2xx answer's body is read up to ``MAX_BATCH_ANSWER`` bytes; a longer one lists no failures.

Credentials in the sink URL (``https://user:password@host/``) are sent as HTTP Basic auth, as
curl, requests and httpx do, and never appear in logs or reasons: those show ``redact(sink)``.
Or a bearer token from ``--sink-token-file`` (Knative's OIDC: ``channels.sinkauth``), read again
when the file changes, checked at most once a second on ``publish`` (sooner after a 401/403),
and ``--sink-header``s. An HTTPS sink is verified against the system's trust plus ``K_CA_CERTS``,
``--sink-ca-file`` and Knative's trust bundles, with an optional client certificate
(``channels.transport.tls``); the context is made once per process.

The headers that are the same for every message (``Host``, ``User-Agent``, ``Authorization``,
``ce-specversion``, ``ce-source``, ``ce-type``, overrides; ``Content-Type`` in structured mode)
are encoded once. Measured here (client CPU per POST to a local sink): requests ~400 us,
http.client 130-170 us, a hand-written blocking client 20-25 us with 4 threads and 120 us with 32;
this transport on uvloop ~10-14 us from 4 to 128 requests in flight.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import os
import re
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import orjson
from mypy_extensions import mypyc_attr

from channels.base import Channel, ChannelError, Message, Outcome, Report
from channels.events import EventError, EventFormat, EventShape, is_extension_name
from channels.options import Option
from channels.plugin import BuildContext, ChannelPlugin
from channels.sinkauth import TokenFile, check_headers, parse_headers, read_token
from channels.transport.http import HttpPool, RequestTemplate
from channels.transport.proxy import http_client_connection, route_for
from channels.transport.tls import KNATIVE_TRUST_BUNDLES, TlsFiles, bundle_files, client_context

__all__ = ["CHANNEL", "REFUSAL_RUN", "HttpChannel", "HttpConfig", "check_url", "outcome_of", "redact"]

MODES = ("binary", "structured", "batch")
# The sink refuses this one event (Knative: 400 "unparsable event"; RFC 9110: 413 content too
# large, 415 unsupported media type, 422 unprocessable content; RFC 6585: 431 header fields too
# large, our extension attributes being headers).
_REFUSED = frozenset({400, 413, 415, 422, 431})
# The sink refuses the poller itself (RFC 9110: 401 unauthenticated, 403 forbidden, 407 proxy
# authentication): a problem of the sink's configuration, never of the message.
_CREDENTIALS = frozenset({401, 403, 407})
# Different events refused in a row with the same status, no 2xx between: the sink's problem.
REFUSAL_RUN = 10
_STRUCTURED = "application/cloudevents+json; charset=utf-8"
_BATCH = "application/cloudevents-batch+json; charset=utf-8"
_BATCH_LINGER = 0.005  # seconds a batch waits to fill (the worker hands messages over one run at a time)
MAX_BATCH_ANSWER = 1024 * 1024  # bytes of a batch answer's body read for batchItemFailures
_USER_AGENT = "sqs-poller"
TOKEN_CHECK_INTERVAL = 1.0  # seconds between two looks at --sink-token-file
_TOKEN_RECHECK = 0.1  # after a 401/403: the next look comes this soon after the last one
_PRINTABLE = re.compile(r"[\x21-\x7e]*")

log = logging.getLogger(__name__)


_HELD_BACK = "held back: the circuit opened before it was sent"


def outcome_of(status: int) -> Outcome:
    """What the sink's final status means for an event (see the module docstring)."""
    if 200 <= status < 300:
        return Outcome.ACK
    return Outcome.REJECT if status in _REFUSED else Outcome.RETRY


@mypyc_attr(native_class=False)  # compiled (setup.py), a class cannot subclass OSError
class _NotSent(OSError):
    """A request withdrawn before it was written (``HttpChannel.shed``)."""


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


def _batch_item_failures(body: bytes | None) -> set[str] | None:
    """The event ids a batch answer lists as failed, or None when the answer is not that shape."""
    if not body:
        return None
    try:
        doc = orjson.loads(body)
        failures = doc["batchItemFailures"]
        return {str(item["itemIdentifier"]) for item in failures}
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None


def redact(url: str) -> str:
    """The URL as logs and reasons may show it: scheme, host and port as they are; no
    ``user:password@``; and of the path and the query only what cannot be a credential.

    Webhook URLs carry their secret in the path (``https://hooks.example/services/T0/B0/XXXX``),
    other sinks in the query (``?token=...``). The rule: a path segment or query key is kept
    only if it is a plain word (``_PLAIN``: 1-20 lowercase letters, ``-`` or ``_``, starting
    with a letter; or an API version such as ``v1``), else it is shown as ``***``; query values
    are always ``***``; a fragment is ``***``. So ``/services/T0/B0/XXXX`` shows as
    ``/services/***/***/***`` and ``/default/my-broker`` as it is.
    """
    try:
        parts = urlsplit(url)
        netloc = parts.netloc.rpartition("@")[2]
        path = "/".join(_plain(segment) for segment in parts.path.split("/"))
        query = urlencode([(_plain(k), "***") for k, _ in parse_qsl(parts.query, keep_blank_values=True)], safe="*")
        if parts.query and not query:
            query = "***"
        return urlunsplit(parts._replace(netloc=netloc, path=path, query=query,
                                         fragment="***" if parts.fragment else ""))
    except ValueError:
        return "<an unparsable URL>"


_PLAIN = re.compile(r"[a-z][a-z_-]{0,19}|v[0-9]{1,2}")


def _plain(word: str) -> str:
    """``word`` if it is a plain word (``_PLAIN``) or empty, else ``***``."""
    return word if not word or _PLAIN.fullmatch(word) else "***"


def basic_auth(url: str) -> str | None:
    """``Authorization`` value for the URL's userinfo (percent-decoded), or None without one."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return None
    userinfo = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
    return "Basic " + base64.b64encode(userinfo.encode()).decode("ascii")


@mypyc_attr(native_class=False)  # pickled for the workers (channels/events.py's EventShape says why)
@dataclass(frozen=True, slots=True, kw_only=True)
class HttpConfig:
    name: ClassVar[str] = "http"

    sink: str = field(repr=False)  # may carry credentials
    mode: str = "binary"
    data_mode: str = "message"
    overrides: Mapping[str, str] = field(default_factory=dict)
    shape: EventShape = field(default_factory=EventShape)
    # Requests in flight per process, each on its own keep-alive connection.
    concurrency: int = 64
    timeout: float = 30.0  # the whole request: connect, send, the full answer
    batch_size: int = 10  # events per request in batch mode
    tls: TlsFiles = field(default_factory=TlsFiles)  # for an https sink
    token_file: str | None = None  # its token is sent as Authorization: Bearer
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # --sink-header (values may be secrets)

    def __post_init__(self) -> None:
        check_url(self.sink)
        check_headers(self.headers)
        authorization = [what for what, given in (
            ("user:password@ in the sink URL", basic_auth(self.sink) is not None),
            ("--sink-token-file", self.token_file is not None),
            ("--sink-header Authorization", any(n.lower() == "authorization" for n, _ in self.headers)),
        ) if given]
        if len(authorization) > 1:
            raise ValueError(f"{' and '.join(authorization)} both set the Authorization header: give one")
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
        if not 1 <= self.batch_size <= 1000:
            raise ValueError(f"--http-batch-size must be between 1 and 1000, not {self.batch_size}")

    @property
    def attempt_timeout(self) -> float:
        return self.timeout

    def create(self, source: str) -> HttpChannel:
        return HttpChannel(self, source)

    @property
    def https(self) -> bool:
        return urlsplit(self.sink).scheme == "https"

    def ssl_context(self) -> ssl.SSLContext | None:
        """The context for an https sink given CAs or a client certificate (once per process:
        reading the system's trust store costs milliseconds); None: the transport's default."""
        return client_context(self.tls) if self.https and self.tls.any else None


def _request_headers(config: HttpConfig, token: str | None) -> dict[str, str]:
    """The headers every request carries besides the event's: the run's and ``poller check``'s."""
    headers: dict[str, str] = {"User-Agent": _USER_AGENT}
    auth = basic_auth(config.sink)
    if auth is not None:
        headers["Authorization"] = auth
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    for name, value in config.headers:
        if name.lower() == "user-agent":
            del headers["User-Agent"]
        headers[name] = value
    return headers


class _SinkAnswers:
    """What the sink's refusals mean, decided across events (on the loop).

    A refusal (``_REFUSED``) sends its message to the DLQ in the end, so it is reported only once
    the sink has shown it takes other events (the next 2xx), or when the attempt's deadline comes:
    then as a REJECT if the sink's last other answer was a 2xx (a quiet queue's poison message),
    but as a RETRY if it was a failure (a sink coming back from an outage in a bad state, whose
    refusals of the circuit's probes must not close the circuit and reject one probe after another).
    ``REFUSAL_RUN`` different events refused in a row with the same status, and no 2xx between,
    make it the sink's problem: those held and the next ones answered so are RETRY until a 2xx,
    and the worker's circuit pauses receiving. A sink that refuses the poller's credentials is
    logged once, until it accepts again. The hot path (a 2xx, nothing pending) is one test.
    """

    def __init__(self, sink: str) -> None:
        self._sink = sink
        self._held: dict[Message, tuple[Report, str, asyncio.TimerHandle]] = {}
        self._status = 0  # the status of the current run of refusals, 0: none
        self._run: set[str] = set()  # the different events in it
        self.broken = 0  # a refusal status that means "the sink's problem" until a 2xx, or 0
        self._credentials = 0  # a credentials status logged since the last 2xx, or 0
        self._working = True  # the sink's last answer other than a refusal was a 2xx
        self.quiet = True  # nothing above is set: a 2xx has nothing to do here

    def accepted(self) -> None:
        """A 2xx: the sink works, so what it refused was about the events."""
        if self.broken or self._credentials:
            log.warning("sink %s accepts events again", self._sink)
        self._status, self.broken, self._credentials, self.quiet = 0, 0, 0, True
        self._working = True
        self._run.clear()
        for message in list(self._held):
            self._confirm(message)

    def failed(self) -> None:
        """An answer (or none) to be retried: the sink is failing."""
        self._working, self.quiet = False, False

    def credentials_refused(self, status: int) -> None:
        self.quiet = False
        if not self._credentials:
            self._credentials = status
            log.warning("sink %s answered HTTP %d: it refuses the poller's credentials; deliveries are "
                        "retried and the circuit pauses receiving, no message is rejected for it",
                        self._sink, status)

    def refused(self, message: Message, report: Report, status: int, reason: str, deadline: float) -> None:
        self.quiet = False
        if status == self.broken:
            report(message, Outcome.RETRY, self._broken_reason(status))
            return
        if status != self._status:  # the sink tells events apart: what it refused before stands
            for held in list(self._held):
                self._confirm(held)
            self._status = status
            self._run.clear()
        self._run.add(message.id)
        if len(self._run) < REFUSAL_RUN:
            timer = asyncio.get_running_loop().call_at(deadline, self._at_deadline, message)
            self._held[message] = (report, reason, timer)
            return
        self.broken = status
        log.warning("sink %s answered HTTP %d to %d different events in a row: taken for a problem of the "
                    "sink, not of the events; they are retried, not rejected, until it accepts one",
                    self._sink, status, REFUSAL_RUN)
        pending, self._held = self._held, {}
        for other, (other_report, _, timer) in pending.items():
            timer.cancel()
            other_report(other, Outcome.RETRY, self._broken_reason(status))
        report(message, Outcome.RETRY, self._broken_reason(status))

    def close(self) -> None:
        """The channel closes: refusals not confirmed yet are not rejections (RETRY)."""
        held, self._held = self._held, {}
        for message, (report, reason, timer) in held.items():
            timer.cancel()
            report(message, Outcome.RETRY, f"{reason}, not confirmed before the channel closed")

    def _confirm(self, message: Message) -> None:
        entry = self._held.pop(message, None)
        if entry is not None:
            report, reason, timer = entry
            timer.cancel()
            report(message, Outcome.REJECT, reason)

    def _at_deadline(self, message: Message) -> None:
        if self._working:
            self._confirm(message)
            return
        entry = self._held.pop(message, None)
        if entry is not None:
            report, reason, _ = entry
            report(message, Outcome.RETRY, f"{reason} while it was failing (not taken for a verdict)")

    def _broken_reason(self, status: int) -> str:
        return (f"sink {self._sink} answered HTTP {status} to {REFUSAL_RUN} different events in a row "
                "(a problem of the sink)")


class HttpChannel(Channel):
    """Lives on the worker's event loop: ``publish`` sends at once, answers come as callbacks."""

    def __init__(self, config: HttpConfig, source: str) -> None:
        self.config = config
        self._format = EventFormat(source=source, data_mode=config.data_mode, overrides=config.overrides,
                                   shape=config.shape)
        self._binary = config.mode == "binary"
        self._batched = config.mode == "batch"
        # A file read here may have gone bad since the start's check: start() says so (ChannelError).
        self._setup_error: str | None = None
        try:
            self._token = TokenFile(config.token_file) if config.token_file else None
            context = config.ssl_context()
        except ValueError as exc:
            self._setup_error, self._token, context = str(exc), None, None
        self._token_checked = 0.0  # loop time of the last look at the token file
        self._token_due = 0.0  # loop time of the next one
        self._batch: list[tuple[Message, bytes]] = []  # batch mode: events waiting to go together
        self._batch_report: Report | None = None
        self._batch_timer: asyncio.TimerHandle | None = None
        url = urlsplit(config.sink)
        https = url.scheme == "https"
        self._pool = HttpPool(url.hostname or "", url.port or (443 if https else 80), tls=https,
                              limit=config.concurrency, connect_timeout=config.timeout,
                              ssl_context=context,
                              proxy=route_for(config.sink).proxy)  # HTTP(S)_PROXY, NO_PROXY
        self._target = (url.path or "/") + (f"?{url.query}" if url.query else "")
        self._template = self._make_template()
        self._sink = redact(config.sink)
        self._answers = _SinkAnswers(self._sink)
        self._timeout = config.timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._in_flight = 0
        self._idle: asyncio.Event | None = None  # set while nothing is in flight (for aclose)

    def start(self) -> None:
        if self._setup_error is not None:
            raise ChannelError(self._setup_error)

    def _make_template(self) -> RequestTemplate:
        """The request's constant part, encoded once (again when the token changes)."""
        headers = _request_headers(self.config, self._token.token if self._token else None)
        if self._binary:
            headers.update(self._format.http_binary_constant())
        else:
            headers["Content-Type"] = _BATCH if self._batched else _STRUCTURED
        return self._pool.template(self._target, headers)

    def _check_token(self, now: float) -> None:
        """One stat of the token file; a new template if its token changed."""
        assert self._token is not None
        self._token_checked, self._token_due = now, now + TOKEN_CHECK_INTERVAL
        if self._token.check() is not None:
            self._template = self._make_template()

    def publish(self, batch: Sequence[Message], report: Report) -> None:
        now = (self._loop or self._bind()).time()
        if self._token is not None and now >= self._token_due:  # the token's cost per publish: this test
            self._check_token(now)
        batch, report = self._format.unwrap(batch, report)  # with --envelope: a message may be N events
        if self._batched:
            self._add_to_batch(batch, report)
            return
        deadline = now + self._timeout
        for message in batch:
            try:
                if self._binary:
                    head, body = self._format.http_binary_head(message)
                    request = self._template.build(body, head)
                else:
                    request = self._template.build(self._format.structured(message))
            except (EventError, TypeError, ValueError) as exc:  # not an event, or not a request
                report(message, Outcome.REJECT, f"cannot make a CloudEvent request: {exc}")
                continue
            self._in_flight += 1
            self._pool.send(request, functools.partial(self._answered, message, report, deadline),
                            timeout=self._timeout)

    def _request_done(self) -> None:
        """A request's answer (or error) is in: one fewer in flight; aclose waits for none."""
        self._in_flight -= 1
        if self._in_flight == 0 and self._idle is not None:
            self._idle.set()

    def _bind(self) -> asyncio.AbstractEventLoop:
        # Looked up once: asyncio.get_running_loop() makes a getpid() syscall each time on 3.11.
        self._loop = asyncio.get_running_loop()
        return self._loop

    def _answered(self, message: Message, report: Report, deadline: float, status: int, retry_after: float,
                  body: bytes | None, error: BaseException | None, *, counted: bool = True) -> None:
        if counted:
            self._request_done()
        if error is not None:
            self._answers.failed()
            report(message, Outcome.RETRY, f"sink {self._sink}: {type(error).__name__}: {error}")
        elif 200 <= status < 300:
            report(message, Outcome.ACK, "")
            if not self._answers.quiet:
                self._answers.accepted()
        elif status in _REFUSED:
            self._answers.refused(message, report, status, f"sink {self._sink} answered HTTP {status}", deadline)
        else:
            self._answers.failed()
            if status in _CREDENTIALS:
                self._answers.credentials_refused(status)
                if self._token is not None:  # a rotated token: look at the file again soon
                    self._token_due = min(self._token_due, self._token_checked + _TOKEN_RECHECK)
            report(message, Outcome.RETRY, f"sink {self._sink} answered HTTP {status}", retry_after)

    # -- batch mode: CloudEvents' batched content mode -------------------------------------------

    def _add_to_batch(self, messages: Sequence[Message], report: Report) -> None:
        for message in messages:
            try:
                event = self._format.structured(message)
            except (EventError, TypeError, ValueError) as exc:
                report(message, Outcome.REJECT, f"cannot make a CloudEvent: {exc}")
                continue
            self._batch.append((message, event))
            self._batch_report = report
            if len(self._batch) >= self.config.batch_size:
                self._send_batch()
        if self._batch and self._batch_timer is None:
            self._batch_timer = (self._loop or self._bind()).call_later(_BATCH_LINGER, self._send_batch)

    def _send_batch(self) -> None:
        if self._batch_timer is not None:
            self._batch_timer.cancel()
            self._batch_timer = None
        batch, self._batch = self._batch, []
        if not batch:
            return
        report = self._batch_report
        assert report is not None
        self._send_events(batch, report, (self._loop or self._bind()).time() + self._timeout)

    def _send_events(self, batch: list[tuple[Message, bytes]], report: Report, deadline: float) -> None:
        """One batch request, within what is left of the attempt's deadline."""
        left = deadline - (self._loop or self._bind()).time()
        if left <= 0:
            for message, _ in batch:
                report(message, Outcome.RETRY, f"sink {self._sink}: no time left in the attempt to send it again")
            return
        self._in_flight += 1
        request = self._template.build(b"[" + b",".join(event for _, event in batch) + b"]")
        self._pool.send(request, functools.partial(self._batch_answered, batch, report, deadline),
                        timeout=left, keep_body=True, max_body=MAX_BATCH_ANSWER)

    def _batch_answered(self, batch: list[tuple[Message, bytes]], report: Report, deadline: float, status: int,
                        retry_after: float, body: bytes | None, error: BaseException | None) -> None:
        """The status applies to every event, unless a 2xx answer lists ``batchItemFailures``
        (EventBridge Pipes' shape: ``{"batchItemFailures": [{"itemIdentifier": "<event id>"}]}``):
        those are retried, the rest acked. A refused batch is split and sent again in halves."""
        self._request_done()
        if error is None and status in _REFUSED and len(batch) > 1 and status != self._answers.broken:
            # A sink's limit on the request (413 above its size) is not a verdict on each event.
            half = len(batch) // 2
            log.debug("sink %s refused a batch of %d with HTTP %d: sending it again in halves",
                      self._sink, len(batch), status)
            self._send_events(batch[:half], report, deadline)
            self._send_events(batch[half:], report, deadline)
            return
        failed = _batch_item_failures(body) if error is None and 200 <= status < 300 else None
        for message, _ in batch:
            if failed is not None and message.id in failed:
                report(message, Outcome.RETRY, f"sink {self._sink} listed it in batchItemFailures")
            else:
                self._answered(message, report, deadline, status, retry_after, None, error, counted=False)

    def shed(self) -> None:
        """Requests waiting for one of the ``concurrency`` connections, and a batch still being
        gathered, were never sent: RETRY now (the worker parks them until the circuit closes)."""
        if self._batch_timer is not None:
            self._batch_timer.cancel()
            self._batch_timer = None
        gathered, self._batch = self._batch, []
        for message, _ in gathered:
            assert self._batch_report is not None
            self._batch_report(message, Outcome.RETRY, _HELD_BACK)
        shed = self._pool.shed(_NotSent(_HELD_BACK))
        if shed or gathered:
            log.info("circuit open: %d request(s) not yet sent held back", shed + bool(gathered))

    async def aclose(self, timeout: float = 30.0) -> None:
        """Wait for the answers in flight, up to ``timeout``; then break off the rest (RETRY)."""
        self._send_batch()
        if self._in_flight:
            self._idle = asyncio.Event()
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except TimeoutError:
                pass
        self._pool.abort()  # what is still in flight reports RETRY (Aborted)
        await asyncio.sleep(0)  # let the transports' callbacks run
        self._answers.close()
        self._pool.close()

    def close(self, timeout: float = 30.0) -> None:
        raise RuntimeError("the HTTP channel lives on the worker's event loop: await aclose()")


# -- the channel as the poller finds it (entry point "http" of sqs_poller.channels) ---------------

OPTIONS = (
    Option(flag="--sink", envvars=("K_SINK",),
           help="HTTP channel: the sink URL (Knative's K_SINK works too); user:password@ is sent as "
                "Basic auth."),
    Option(flag="--http-mode", run_only=True, choices=MODES, default="binary",
           help="HTTP channel: CloudEvents content mode; batch: up to --http-batch-size events per request."),
    Option(flag="--http-batch-size", run_only=True, kind=int, low=1, high=1000, default=10,
           help="HTTP channel, batch mode: events per request; a 2xx answer with batchItemFailures "
                "retries just those."),
    Option(flag="--http-concurrency", run_only=True, kind=int, low=1, high=1024, default=64,
           help="HTTP channel: requests in flight per process at most, each on a keep-alive connection."),
    Option(flag="--http-timeout", kind=float, low=0.001, high=3600, default=30.0,
           help="HTTP channel: seconds for a whole delivery attempt (waiting for a connection, connect, "
                "send, the full answer)."),
    Option(flag="--sink-ca-file", metavar="PATH",
           help="HTTP channel: a PEM file of CA certificates an https sink is verified with, in addition "
                "to the system's (as are K_CA_CERTS and Knative's trust bundles in /knative-custom-certs)."),
    Option(flag="--sink-ca-certs", envvars=("K_CA_CERTS",), metavar="PEM",
           help="HTTP channel: PEM text of CA certificates, in addition to the system's (Knative's "
                "SinkBinding sets K_CA_CERTS for an https sink)."),
    Option(flag="--sink-client-cert", metavar="PATH",
           help="HTTP channel: a PEM client certificate for mutual TLS (its key in it, or in "
                "--sink-client-key)."),
    Option(flag="--sink-client-key", metavar="PATH",
           help="HTTP channel: the unencrypted PEM private key of --sink-client-cert."),
    Option(flag="--sink-token-file", metavar="PATH",
           help="HTTP channel: a file whose token is sent as Authorization: Bearer (Knative's OIDC token, "
                "a projected service account token), read again when the file changes; never logged."),
    Option(flag="--sink-header", multiple=True, lines=True, metavar="'NAME: VALUE'",
           help="HTTP channel: a header sent with every request, repeatable (env: one per line); ${VAR} in "
                "the value is the environment variable VAR."),
)


def _build(context: BuildContext) -> HttpConfig:
    values = context.values
    if not values["sink"]:
        raise ValueError("the http channel needs a sink: pass --sink URL or set K_SINK")
    tls = TlsFiles(ca_file=values["sink_ca_file"], ca_pem=values["sink_ca_certs"] or None,
                   bundle_dir=KNATIVE_TRUST_BUNDLES, client_cert=values["sink_client_cert"],
                   client_key=values["sink_client_key"])
    config = HttpConfig(sink=values["sink"], mode=values["http_mode"], data_mode=context.data_mode,
                        overrides=context.overrides, shape=context.shape, concurrency=values["http_concurrency"],
                        timeout=values["http_timeout"], batch_size=values["http_batch_size"], tls=tls,
                        token_file=values["sink_token_file"],
                        headers=parse_headers(values["sink_header"], os.environ))
    # Every file is read once here, so that a bad one is a one-line start error, not a worker's
    # (with none, nothing can be wrong: the system's CAs alone took ~40 ms of the start to load).
    if tls.any:
        client_context(tls)
    if config.token_file:
        read_token(config.token_file)
    return config


def _describe(config: HttpConfig) -> str:
    extras = []
    route = route_for(config.sink)
    if route.proxy is not None or route.bypassed:  # as SQS's route: said when a proxy variable applies
        extras.append(str(route))
    if config.https:
        cas = [what for what, given in (("--sink-ca-file", config.tls.ca_file), ("K_CA_CERTS", config.tls.ca_pem),
                                         (str(config.tls.bundle_dir), bundle_files(config.tls.bundle_dir))) if given]
        if cas:
            extras.append(f"trusting {', '.join(cas)} beside the system's CAs")
        if config.tls.client_cert:
            extras.append("client certificate")
    if config.token_file:
        extras.append(f"bearer token from {config.token_file}")
    if config.headers:
        extras.append(f"headers {', '.join(name for name, _ in config.headers)}")
    return f"sink {redact(config.sink)} ({config.mode}, data={config.data_mode}{''.join(f'; {e}' for e in extras)})"


def _probe(config: HttpConfig, source: str) -> tuple[str, str]:
    """An OPTIONS request: any status proves the sink is there (``poller check``)."""
    import http.client  # only `poller check` asks

    timeout = min(config.timeout, 10.0)
    try:  # the run's TLS settings, headers and proxy: never around the proxy the deliveries take
        context = config.ssl_context() or ssl.create_default_context()
        headers = _request_headers(config, read_token(config.token_file) if config.token_file else None)
        route = route_for(config.sink)
    except ValueError as exc:
        raise ChannelError(str(exc)) from None
    if "User-Agent" in headers:
        headers["User-Agent"] = "sqs-poller check"
    conn, target = http_client_connection(config.sink, route, timeout=timeout, context=context)
    try:
        conn.request("OPTIONS", target, headers=headers)
        status = conn.getresponse().status
    except (OSError, http.client.HTTPException) as exc:
        raise ChannelError(f"sink {redact(config.sink)} does not answer, {route}: {type(exc).__name__}: "
                           f"{exc}") from None
    finally:
        conn.close()
    return "sink", f"{redact(config.sink)} answered OPTIONS with HTTP {status}, {route}"


CHANNEL = ChannelPlugin(name="http", options=OPTIONS, build=_build, deadline="--http-timeout",
                        describe=_describe, probe=_probe)
