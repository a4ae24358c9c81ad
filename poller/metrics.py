"""What the supervisor serves over HTTP: Prometheus ``/metrics``, ``/healthz`` and ``/readyz``.

The workers' counters and histograms already reach the supervisor (shared memory, once a
second) for the throughput log line; the collector reads the same totals at scrape time, so
the hot path pays nothing for metrics. Every metric is labelled with the queue (its name) and
the channel. What /healthz and /readyz mean is the supervisor's (``Supervisor.health``/``ready``).

The port is often bound to 0.0.0.0 (the kubelet probes the pod IP), so anyone who reaches it
can open connections. The server is one thread with an asyncio loop, never a thread per
connection (wsgiref's ThreadingMixIn and prometheus_client's ``start_http_server`` start one
per connection, unbounded: 400 idle connections took 399 threads and 4 GB of address space):

- at most ``MAX_CONNECTIONS`` are open; one more closes the oldest that has not sent its whole
  request head yet, so a probe, which sends its request at once, always gets in and is answered
  within milliseconds however many idle connections a client holds;
- the whole request head must arrive within ``HEAD_TIMEOUT`` seconds of the accept (slowloris),
  the answer must be taken within ``SEND_TIMEOUT``; one request per connection (``Connection:
  close``, RFC 9112 9.6); a head over ``MAX_HEAD`` bytes is answered 431 (RFC 6585 5).
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
import platform
import socket
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from poller.logs import RateLimitedLog
from poller.stats import FIELDS, HISTOGRAMS, REJECT_REASONS, histogram
from poller.version import poller_version

__all__ = ["HEAD_TIMEOUT", "MAX_CONNECTIONS", "HttpServer", "PollerCollector", "Probe", "serve"]

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 32  # open at once; probes and scrapes need a handful
HEAD_TIMEOUT = 3.0  # seconds from the accept to the end of the request head (kubelet's timeoutSeconds >= 1)
SEND_TIMEOUT = 5.0  # seconds for the client to take the answer
MAX_HEAD = 8192  # bytes of request line and headers

# Counter name (``_total`` is added by the client) and help, per stats field.
_COUNTERS = {
    "received": ("sqs_poller_messages_received", "Messages received from SQS."),
    "acked": ("sqs_poller_messages_acked", "Messages the channel acknowledged."),
    "deleted": ("sqs_poller_messages_deleted", "Messages deleted from SQS after their ack."),
    "retried": ("sqs_poller_delivery_retries", "Delivery attempts repeated in place after a failure."),
    "returned": ("sqs_poller_messages_returned", "Messages given back to SQS undelivered (visibility changed)."),
    "delete_failed": ("sqs_poller_delete_failures", "Deletes that failed after retries (redelivered)."),
    "expired": ("sqs_poller_receipts_expired", "Receipt handles that expired before the delete."),
    "receive_errors": ("sqs_poller_receive_errors", "Failed ReceiveMessage calls."),
    "extended": ("sqs_poller_visibility_extensions", "Visibility extensions of held messages."),
}
_HISTOGRAMS = {
    "receive": ("sqs_poller_receive_seconds", "ReceiveMessage calls, long-poll wait included."),
    "publish": ("sqs_poller_publish_seconds", "Deliveries: from handing a message to the channel to its verdict."),
    "delete": ("sqs_poller_delete_seconds", "DeleteMessageBatch calls, retries included."),
    "age": ("sqs_poller_message_age_seconds", "Message age when the channel acknowledged it: now minus SentTimestamp."),
}
_LABELS = ("queue", "channel")


Probe = Callable[[], tuple[bool, str]]
"""``() -> (ok, reason)`` for /healthz and /readyz."""


@dataclass(frozen=True, slots=True)
class PollerCollector(Collector):
    totals: Callable[[], Sequence[int]]
    workers: Callable[[], int]
    restarts: Callable[[], int]
    queue: str
    channel: str
    healthy: Callable[[], int] | None = None  # workers alive and beating (Supervisor.healthy_workers)
    target: Callable[[], int] | None = None  # workers wanted (--processes auto moves it)
    version: str = dataclasses.field(default_factory=poller_version)
    python: str = dataclasses.field(default_factory=platform.python_version)

    def collect(self) -> Iterator[Metric]:
        totals = self.totals()
        values = dict(zip(FIELDS, totals, strict=False))
        labels = [self.queue, self.channel]
        # The usual *_build_info: 1, with what runs in its labels (a rollout shows as two versions).
        yield _one(GaugeMetricFamily("sqs_poller_build_info", "Always 1: the poller's version and Python.",
                                     labels=(*_LABELS, "version", "python")),
                   [*labels, self.version, self.python], 1)
        for field, (name, help_text) in _COUNTERS.items():
            yield _one(CounterMetricFamily(name, help_text, labels=_LABELS), labels, values[field])
        rejected = CounterMetricFamily(
            "sqs_poller_messages_rejected", "Messages the channel refused; left to the redrive policy. reason: event "
            "(cannot be made an event), sink (the sink or broker refused it), other.", labels=(*_LABELS, "reason"))
        for reason in REJECT_REASONS:
            rejected.add_metric([*labels, reason], values[f"rejected_{reason}"])
        yield rejected
        yield _one(GaugeMetricFamily("sqs_poller_messages_in_flight",
                                     "Messages held: delivering, waiting for a retry, or acked and not yet deleted.",
                                     labels=_LABELS), labels, values["in_flight"])
        yield _one(GaugeMetricFamily("sqs_poller_receivers",
                                     "Long polls the workers' receive windows allow at once (a receive may still wait "
                                     "for room below --max-in-flight): --receivers each, more while a backlog waits "
                                     "and SQS's round trip calls for them (up to --max-receivers).",
                                     labels=_LABELS), labels, values["receivers"])
        yield _one(GaugeMetricFamily("sqs_poller_circuit_open",
                                     "Workers whose channel is down (receiving paused, probing).",
                                     labels=_LABELS), labels, values["circuit_open"])
        yield _one(GaugeMetricFamily("sqs_poller_workers", "Worker processes alive.", labels=_LABELS),
                   labels, self.workers())
        if self.healthy is not None:
            yield _one(GaugeMetricFamily("sqs_poller_workers_healthy",
                                         "Worker processes alive and sending their heartbeat.", labels=_LABELS),
                       labels, self.healthy())
        if self.target is not None:
            yield _one(GaugeMetricFamily("sqs_poller_workers_target",
                                         "Worker processes the supervisor wants running: --processes, or with "
                                         "auto what the load asks for (1 to --max-processes).", labels=_LABELS),
                       labels, self.target())
        yield _one(CounterMetricFamily("sqs_poller_worker_restarts", "Worker processes restarted.",
                                       labels=_LABELS), labels, self.restarts())
        for field in HISTOGRAMS:
            name, help_text = _HISTOGRAMS[field]
            buckets, total, _count = histogram(totals, field)
            family = HistogramMetricFamily(name, help_text, labels=_LABELS)
            family.add_metric(labels, buckets=buckets, sum_value=total)
            yield family


def _one(family: GaugeMetricFamily | CounterMetricFamily, labels: list[str], value: float) -> Metric:
    family.add_metric(labels, value)
    return family




def serve(host: str, port: int, *, health: Probe, ready: Probe,
          collector: Collector | None = None, sock: socket.socket | None = None) -> HttpServer:
    """Serve /healthz and /readyz (and /metrics with a ``collector``) from a daemon thread;
    OSError if the port cannot be bound (raised here, before the thread starts). ``sock``: a
    listening socket bound already (to ``host`` and ``port``), served instead."""
    metrics_app = None
    if collector is not None:
        registry = CollectorRegistry(auto_describe=True)
        registry.register(collector)
        metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path in ("/healthz", "/readyz"):
            ok, reason = (health if path == "/healthz" else ready)()
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [(reason or "ok").encode() + b"\n"]
        if path == "/metrics" and metrics_app is not None:
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: /healthz, /readyz" + (b", /metrics" if metrics_app else b"") + b"\n"]

    return HttpServer(host, port, app, sock=sock)


WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class HttpServer:
    """A small HTTP/1.1 server for a fast WSGI app, on an asyncio loop in one daemon thread;
    the limits are the module's (``MAX_CONNECTIONS``, ``HEAD_TIMEOUT``, ...). The app runs on
    the loop: it must answer in microseconds, as the probes and the collector do."""

    def __init__(self, host: str, port: int, app: WsgiApp, *, max_connections: int = MAX_CONNECTIONS,
                 head_timeout: float = HEAD_TIMEOUT, send_timeout: float = SEND_TIMEOUT,
                 sock: socket.socket | None = None) -> None:
        self._app = app
        self._max = max_connections
        self._head_timeout = head_timeout
        self._send_timeout = send_timeout
        # Open connections, oldest first -> whether their request head has arrived.
        self._open: dict[asyncio.StreamWriter, bool] = {}
        self._dropped = RateLimitedLog(log, "http server: %d connection(s) dropped (last: %s)", every=60.0)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = sock or socket.create_server((host, port), family=family, backlog=128)
        self.address: tuple[str, int] = self._sock.getsockname()[:2]
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(_log_loop_error)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._connection, sock=self._sock, limit=MAX_HEAD))
        self._thread = threading.Thread(target=self._run, name="http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving and end the thread (the poller never does; tests do)."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10.0)

    def _run(self) -> None:
        try:
            self._loop.run_forever()
        finally:
            self._server.close()
            for writer in list(self._open):
                writer.transport.abort()
            self._loop.run_until_complete(_cancel_all())
            self._loop.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open[writer] = False
        if len(self._open) > self._max:
            self._evict()
        try:
            async with asyncio.timeout(self._head_timeout):
                head = await reader.readuntil(b"\r\n\r\n")
            self._open[writer] = True
            status, headers, body = self._answer(head, writer)
        except TimeoutError:
            self._drop(writer, f"no request within {self._head_timeout:g}s")
            return
        except asyncio.LimitOverrunError:
            self._open[writer] = True
            status, headers, body = _plain_answer(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
        except (asyncio.IncompleteReadError, ConnectionError):
            self._forget(writer)  # closed by the client, or evicted
            writer.transport.abort()
            return
        await self._send(writer, status, headers, body)

    def _evict(self) -> None:
        """Over the cap: close the oldest connection still waiting for its request head."""
        for writer, has_head in self._open.items():
            if not has_head:
                self._drop(writer, f"over {self._max} open connections")
                return

    def _drop(self, writer: asyncio.StreamWriter, why: str) -> None:
        self._forget(writer)
        writer.transport.abort()
        self._dropped.hit(why)

    def _forget(self, writer: asyncio.StreamWriter) -> None:
        self._open.pop(writer, None)

    def _answer(self, head: bytes, writer: asyncio.StreamWriter) -> tuple[str, list[tuple[str, str]], bytes]:
        environ = _environ(head, self.address, writer.get_extra_info("peername"))
        if environ is None:
            return _plain_answer(HTTPStatus.BAD_REQUEST)
        if environ["REQUEST_METHOD"] not in ("GET", "HEAD"):
            status, headers, body = _plain_answer(HTTPStatus.METHOD_NOT_ALLOWED)
            return status, [*headers, ("Allow", "GET, HEAD")], body
        answer: list[Any] = []

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
            answer[:] = [status, list(headers)]

        try:
            body = b"".join(self._app(environ, start_response))
        except Exception as exc:  # noqa: BLE001 - one line, and the server keeps serving
            log.warning("http server: %s failed: %s: %s", environ["PATH_INFO"], type(exc).__name__, exc)
            return _plain_answer(HTTPStatus.INTERNAL_SERVER_ERROR)
        if not answer:  # the app broke WSGI's contract
            return _plain_answer(HTTPStatus.INTERNAL_SERVER_ERROR)
        status, headers = answer
        if environ["REQUEST_METHOD"] == "HEAD":  # the length a GET would get (RFC 9110 9.3.2)
            return status, [*headers, ("Content-Length", str(len(body)))], b""
        return status, headers, body

    async def _send(self, writer: asyncio.StreamWriter, status: str, headers: list[tuple[str, str]],
                    body: bytes) -> None:
        if not any(k.lower() == "content-length" for k, _ in headers):
            headers = [*headers, ("Content-Length", str(len(body)))]
        lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers if k.lower() != "connection"),
                 "Connection: close", "", ""]
        try:
            writer.write("\r\n".join(lines).encode("latin-1") + body)
            async with asyncio.timeout(self._send_timeout):
                await writer.drain()
                writer.close()
                await writer.wait_closed()
        except TimeoutError:
            self._dropped.hit(f"the answer not taken within {self._send_timeout:g}s")
        except ConnectionError:
            pass
        finally:
            self._forget(writer)
            writer.transport.abort()  # a no-op once closed


async def _cancel_all() -> None:
    tasks = asyncio.all_tasks() - {asyncio.current_task()}
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _log_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    exc = context.get("exception")
    log.warning("http server: %s%s", context.get("message", "error"), f" ({type(exc).__name__}: {exc})" if exc else "")


def _plain_answer(status: HTTPStatus) -> tuple[str, list[tuple[str, str]], bytes]:
    return f"{status.value} {status.phrase}", [("Content-Type", "text/plain")], f"{status.phrase}\n".encode()


def _environ(head: bytes, server: tuple[str, int], peer: Any) -> dict[str, Any] | None:
    """The WSGI environ (PEP 3333) of a request head; None if it is not one."""
    try:
        lines = head.decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ")
    except ValueError:
        return None
    if not version.startswith("HTTP/1.") or not target.startswith("/"):
        return None
    path, _, query = target.partition("?")
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method, "SCRIPT_NAME": "", "PATH_INFO": unquote(path, "latin-1"),
        "QUERY_STRING": query, "SERVER_NAME": server[0], "SERVER_PORT": str(server[1]),
        "SERVER_PROTOCOL": version, "REMOTE_ADDR": peer[0] if peer else "",
        "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(),
        "wsgi.errors": sys.stderr, "wsgi.multithread": False, "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            return None
        key = name.upper().replace("-", "_")
        if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            key = "HTTP_" + key
        environ[key] = value.strip()
    return environ
