"""An in-memory CloudEvents channel (like Knative's in-memory channel): ``poller channel``.

It accepts CloudEvents over HTTP POST (binary and structured content modes) and fans each one
out, unchanged (same ``ce-*`` / ``Content-Type`` headers, same body), to every subscriber. It
takes batched content mode too (the poller's ``--http-mode batch``; Knative's own channels and
brokers do not): each event of a batch goes to every subscriber on its own, in structured mode,
and the batch is answered from the events' answers (``batch_reply``: the events that failed are
listed as ``batchItemFailures``). It answers the sender only after all subscribers answered:

- every subscriber answered 2xx: ``202 Accepted``;
- any subscriber failed with 5xx, 429, a timeout or a connection error (or anything else that
  is not 2xx/4xx): ``502 Bad Gateway``, which the poller retries later;
- otherwise every failure was a 4xx (not 429): that 4xx (the first by subscriber order), which
  the poller treats as a permanent reject;
- a request that is not a CloudEvent: ``400`` with a one-line reason.

So the poller deletes a message only once it reached every subscriber. Delivery is
at-least-once: when one subscriber fails, the others already have the event and get it again
on the retry. The channel keeps nothing, neither events nor state, across restarts: what is not
yet answered when it stops is simply not acknowledged, and the queue redelivers it.

Deliveries run on a small thread pool per subscriber (so a slow subscriber ties up only its own
threads) over pooled keep-alive connections (urllib3), with timeouts and no retries of its own:
retrying is the poller's job.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import urllib3

from poller.kit.cehttp import (
    STRUCTURED_CONTENT_TYPE,
    CloudEventServer,
    NotACloudEvent,
    Reply,
    ServerOptions,
    Tally,
    batch_reply,
    is_batch,
    parse_batch,
    parse_event,
    run_until_signalled,
)

__all__ = ["ChannelCounts", "FanoutOptions", "InMemoryChannelServer", "serve_channel"]

log = logging.getLogger(__name__)

# Besides every ce-* header: the data's content type and the W3C trace context (the CloudEvents
# distributed-tracing extension travels in these headers).
FORWARDED_HEADERS = frozenset({"content-type", "traceparent", "tracestate"})


@dataclass(frozen=True, slots=True, kw_only=True)
class FanoutOptions:
    """How the channel talks to its subscribers."""

    timeout: float = 10.0  # read timeout of one delivery, seconds
    connect_timeout: float = 3.0
    threads: int = 16  # concurrent deliveries per subscriber (and kept-alive connections)
    server: ServerOptions = field(default_factory=ServerOptions)

    def __post_init__(self) -> None:
        if self.timeout <= 0 or self.connect_timeout <= 0:
            raise ValueError("timeouts must be positive")
        if self.threads < 1:
            raise ValueError("threads must be >= 1")

    @property
    def deadline(self) -> float:
        """Longest a request waits for its fan-out, queueing for a delivery thread included."""
        return self.connect_timeout + self.timeout + 1.0


@dataclass(frozen=True, slots=True)
class ChannelCounts:
    """``received``: valid events; ``delivered``: reached every subscriber; ``failed``: did not;
    ``invalid``: requests answered 400 because they were not CloudEvents."""

    received: int = 0
    delivered: int = 0
    failed: int = 0
    invalid: int = 0


@dataclass(frozen=True, slots=True)
class _Outcome:
    url: str
    status: int | None  # None: no HTTP answer (timeout, connection error)
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def permanent(self) -> bool:
        return self.status is not None and 400 <= self.status < 500 and self.status != 429

    def __str__(self) -> str:
        return f"{self.url}: {self.status if self.status is not None else self.error}"


def _check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"subscriber {url!r} is not an http(s) URL")
    try:
        parts.port  # noqa: B018 (raises ValueError on a bad port)
    except ValueError:
        raise ValueError(f"subscriber {url!r} has an invalid port") from None
    return url


class InMemoryChannelServer(CloudEventServer):
    """The in-memory channel. Binds in the constructor (``port=0``: a free port), see ``.url``.

    ``start()`` / ``serve_forever()`` / ``stop()``, or use it as a context manager (starts it).
    ``counts`` gives a ``ChannelCounts`` snapshot. Keeps nothing across restarts.
    """

    def __init__(
        self,
        host: str,
        port: int,
        subscribers: Sequence[str],
        *,
        options: FanoutOptions | None = None,
    ) -> None:
        if not subscribers:
            raise ValueError("the channel needs at least one subscriber")
        self.subscribers: tuple[str, ...] = tuple(_check_url(url) for url in subscribers)
        self.options = options or FanoutOptions()
        opts = self.options
        # One pool per subscriber host; block=False so a burst never deadlocks, it only opens
        # (and then drops) extra connections beyond `threads`.
        self._http = urllib3.PoolManager(
            num_pools=max(10, len(self.subscribers)),
            maxsize=opts.threads,
            block=False,
            timeout=urllib3.Timeout(connect=opts.connect_timeout, read=opts.timeout),
            # No retries here: the poller retries (with backoff) when we answer 502.
            retries=False,
        )
        self._pools = [
            ThreadPoolExecutor(max_workers=opts.threads, thread_name_prefix=f"fanout-{i}")
            for i in range(len(self.subscribers))
        ]
        self._tally = Tally(ChannelCounts())
        super().__init__(host, port, server_options=opts.server)

    @property
    def counts(self) -> ChannelCounts:
        return self._tally.value

    def handle(self, headers: dict[str, str], body: bytes) -> Reply:
        try:
            if is_batch(headers):
                events = [(str(event["id"]), encoded) for event, encoded in parse_batch(body)]
            else:
                # Only the attributes matter here: the body is forwarded as it came.
                events = [(str(parse_event(headers, body, decode_data=False)["id"]), body)]
        except NotACloudEvent as exc:
            self._tally.add(invalid=1)
            return Reply(400, str(exc))
        self._tally.add(received=len(events))
        forward = {k: v for k, v in headers.items() if k.startswith("ce-") or k in FORWARDED_HEADERS}
        if not is_batch(headers):
            return self._collect(events[0][0], self._fan_out(forward, body))
        # Each event of a batch on its own, in structured mode: all of them at once.
        forward["content-type"] = STRUCTURED_CONTENT_TYPE
        fanned = [(event_id, self._fan_out(forward, encoded)) for event_id, encoded in events]
        return batch_reply([(event_id, self._collect(event_id, futures)) for event_id, futures in fanned])

    def _fan_out(self, headers: Mapping[str, str], body: bytes) -> list[Future[_Outcome]]:
        return [pool.submit(self._deliver, url, headers, body)
                for url, pool in zip(self.subscribers, self._pools, strict=True)]

    def _collect(self, event_id: str, futures: list[Future[_Outcome]]) -> Reply:
        done, _ = wait_futures(futures, timeout=self.options.deadline)
        outcomes: list[_Outcome] = []
        for url, future in zip(self.subscribers, futures, strict=True):
            if future in done:
                outcomes.append(future.result())
            else:
                future.cancel()  # still queued: drop it; if running, its own timeout ends it
                outcomes.append(_Outcome(url, None, "timed out waiting for the subscriber"))
        return self._decide(event_id, outcomes)

    def _decide(self, event_id: str, outcomes: list[_Outcome]) -> Reply:
        failures = [o for o in outcomes if not o.ok]
        if not failures:
            self._tally.add(delivered=1)
            return Reply(202)
        self._tally.add(failed=1)
        retryable = [o for o in failures if not o.permanent]
        status = 502 if retryable else failures[0].status
        assert status is not None
        detail = "; ".join(str(o) for o in failures)
        log.warning("fan-out of event %r failed, answering %d: %s", event_id, status, detail)
        return Reply(status, f"subscriber(s) failed: {detail}")

    def _deliver(self, url: str, headers: Mapping[str, str], body: bytes) -> _Outcome:
        try:
            response = self._http.urlopen("POST", url, body=body, headers=dict(headers), redirect=False)
        except urllib3.exceptions.MaxRetryError as exc:
            return _Outcome(url, None, _request_error(exc.reason or exc))
        except Exception as exc:  # noqa: BLE001 (any failure is a failed delivery, not a crash)
            return _Outcome(url, None, _request_error(exc))
        return _Outcome(url, response.status)

    def close(self) -> None:
        for pool in self._pools:
            pool.shutdown(wait=False, cancel_futures=True)
        self._http.clear()


def _request_error(exc: BaseException) -> str:
    if isinstance(exc, urllib3.exceptions.NewConnectionError):  # (a ConnectTimeoutError subclass)
        return f"cannot connect: {str(exc).rsplit(': ', 1)[-1]}"
    if isinstance(exc, (urllib3.exceptions.TimeoutError, TimeoutError)):
        return "timeout"
    # urllib3 messages start with the connection's repr; the useful part is the last one.
    return f"{type(exc).__name__}: {str(exc).rsplit(': ', 1)[-1]}"


def serve_channel(port: int, subscribers: list[str], host: str = "127.0.0.1") -> None:
    """Run the in-memory channel until SIGTERM / SIGINT, then stop cleanly (for the CLI).

    It keeps nothing across restarts: events not yet answered are redelivered by the queue.
    Raises ``ValueError`` for a bad subscriber URL and ``OSError`` if the port cannot be bound.
    """
    server = InMemoryChannelServer(host, port, subscribers)

    def stopped() -> str:
        c = server.counts
        return (
            f"in-memory channel stopped: received {c.received}, delivered {c.delivered}, "
            f"failed {c.failed}, invalid {c.invalid}"
        )

    run_until_signalled(
        server,
        f"in-memory channel listening on {server.url.rstrip('/')}, "
        f"fanning out to {len(server.subscribers)} subscribers",
        stopped,
    )
