"""What the supervisor serves over HTTP: Prometheus ``/metrics``, ``/healthz`` and ``/readyz``.

The workers' counters and histograms already reach the supervisor (shared memory, once a
second) for the throughput log line; the collector reads the same totals at scrape time, so
the hot path pays nothing for metrics. Every metric is labelled with the queue (its name) and
the channel.

``/healthz``: 200 while the supervisor's loop runs and every worker is alive and sends its
heartbeat; else 503 with the reason in the body. ``/readyz``: 200 once SQS answered (the start
check) and a worker has started its channel; 503 before that and while stopping.
"""

from __future__ import annotations

import socketserver
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from poller.stats import FIELDS, HISTOGRAMS, histogram

__all__ = ["Probe", "PollerCollector", "serve"]

# Counter name (``_total`` is added by the client) and help, per stats field.
_COUNTERS = {
    "received": ("sqs_poller_messages_received", "Messages received from SQS."),
    "acked": ("sqs_poller_messages_acked", "Messages the channel acknowledged."),
    "deleted": ("sqs_poller_messages_deleted", "Messages deleted from SQS after their ack."),
    "retried": ("sqs_poller_delivery_retries", "Delivery attempts repeated in place after a failure."),
    "returned": ("sqs_poller_messages_returned", "Messages given back to SQS undelivered (visibility changed)."),
    "rejected": ("sqs_poller_messages_rejected", "Messages the channel refused; left to the redrive policy."),
    "delete_failed": ("sqs_poller_delete_failures", "Deletes that failed after retries (redelivered)."),
    "expired": ("sqs_poller_receipts_expired", "Receipt handles that expired before the delete."),
    "receive_errors": ("sqs_poller_receive_errors", "Failed ReceiveMessage calls."),
    "extended": ("sqs_poller_visibility_extensions", "Visibility extensions of held messages."),
}
_HISTOGRAMS = {
    "receive": ("sqs_poller_receive_seconds", "ReceiveMessage calls, long-poll wait included."),
    "publish": ("sqs_poller_publish_seconds", "Deliveries: from handing a message to the channel to its verdict."),
    "delete": ("sqs_poller_delete_seconds", "DeleteMessageBatch calls, retries included."),
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

    def collect(self) -> Iterator[Metric]:
        totals = self.totals()
        values = dict(zip(FIELDS, totals, strict=False))
        labels = [self.queue, self.channel]
        for field, (name, help_text) in _COUNTERS.items():
            yield _one(CounterMetricFamily(name, help_text, labels=_LABELS), labels, values[field])
        yield _one(GaugeMetricFamily("sqs_poller_messages_in_flight",
                                     "Messages held: delivering, waiting for a retry, or acked and not yet deleted.",
                                     labels=_LABELS), labels, values["in_flight"])
        yield _one(GaugeMetricFamily("sqs_poller_circuit_open",
                                     "Workers whose channel is down (receiving paused, probing).",
                                     labels=_LABELS), labels, values["circuit_open"])
        yield _one(GaugeMetricFamily("sqs_poller_workers", "Worker processes alive.", labels=_LABELS),
                   labels, self.workers())
        yield _one(CounterMetricFamily("sqs_poller_worker_restarts", "Worker processes restarted.",
                                       labels=_LABELS), labels, self.restarts())
        for field in HISTOGRAMS:
            name, help_text = _HISTOGRAMS[field]
            buckets, total, _count = histogram(totals, field)
            family = HistogramMetricFamily(name, help_text, labels=_LABELS)
            family.add_metric(labels, buckets=buckets, sum_value=total)
            yield family


def _one(family: Any, labels: list[str], value: float) -> Metric:
    family.add_metric(labels, value)
    return family


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # probes every few seconds would flood the log


def serve(host: str, port: int, *, health: Probe, ready: Probe,
          collector: Collector | None = None) -> WSGIServer:
    """Serve /healthz and /readyz (and /metrics with a ``collector``) from a daemon thread;
    OSError if the port cannot be bound."""
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

    server = make_server(host, port, app, server_class=_Server, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server
