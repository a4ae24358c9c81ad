"""Prometheus metrics of the whole poller, served by the supervisor (``--metrics-port``).

The workers' counters already reach the supervisor (shared memory, once a second) for the
throughput log line; this collector reads the same totals at scrape time, so the hot path pays
nothing for metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from poller.stats import FIELDS

__all__ = ["PollerCollector", "serve_metrics"]

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
    "extended": ("sqs_poller_visibility_extensions", "Visibility extensions of slow in-flight messages."),
}


class PollerCollector(Collector):
    def __init__(self, totals: Callable[[], Sequence[int]], workers: Callable[[], int],
                 restarts: Callable[[], int]) -> None:
        self._totals = totals
        self._workers = workers
        self._restarts = restarts

    def collect(self) -> Iterator[Metric]:
        values = dict(zip(FIELDS, self._totals()))
        for field, (name, help_text) in _COUNTERS.items():
            yield CounterMetricFamily(name, help_text, value=values[field])
        yield GaugeMetricFamily("sqs_poller_messages_in_flight",
                                "Messages received and not yet settled by the channel.",
                                value=values["in_flight"])
        yield GaugeMetricFamily("sqs_poller_circuit_open",
                                "Workers whose channel is down (receiving paused, probing).",
                                value=values["circuit_open"])
        yield GaugeMetricFamily("sqs_poller_workers", "Worker processes alive.", value=self._workers())
        yield CounterMetricFamily("sqs_poller_worker_restarts", "Worker processes restarted.",
                                  value=self._restarts())


def serve_metrics(collector: Collector, host: str, port: int) -> WSGIServer:
    """Serve ``/metrics`` from a daemon thread; raises OSError if the port cannot be bound."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(collector)
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
