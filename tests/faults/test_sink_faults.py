"""Fault suite: what a sink answers, and how fast. A sink answering 404, 401 or 400 to every event
for a while; a sink with a body limit refusing batches with 413 (and the in-memory channel taking
batches); a 2xx answer with a huge body; a sink slower than the poller's queue of requests; a
sink that accepts connections and never answers.

Real LocalStack SQS -> the real ``poller run`` -> a real HTTP sink (the dumper, the in-memory
channel, or a small sink of this module). Every case counts what the sink really accepted and
asserts lost = 0, and the queue's DLQ empty where it has one: a healthy message must never reach
it because the sink misbehaved.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import pytest

from faultproxy import Fault, FaultProxy
from poller.kit.cehttp import ServerOptions
from poller.kit.dumper import DumperServer
from poller.kit.inmemory import InMemoryChannelServer
from support import (
    FaultCase, PollerProcess, SinkDeliveries, Tally, dumper_sink, send_messages, tally, wait_empty,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults]

# Short deadlines: a refusal is held at most --http-timeout, a stalled request fails after it.
SHORT_DEADLINES = ("--http-timeout", "2", "--max-processing-time", "3")
QUICK_NACKS = ("--nack-backoff", "1", "--nack-backoff-max", "4")



def receive_counts(server: DumperServer) -> Counter[int]:
    """How many accepted events were delivered at their 1st, 2nd, ... receive (--data message:
    the event's data is the SQS message, attributes included)."""
    return Counter(int(e["data"]["Attributes"]["ApproximateReceiveCount"]) for e in server.events)


def answering(*phases: tuple[int, float]) -> Callable[[dict[str, Any], Any], int | None]:
    """A dumper ``respond``: from the first event on, each (status, seconds) phase in turn answers
    that status to every event; then 200."""
    lock = threading.Lock()
    first: list[float] = []

    def respond(event: dict[str, Any], headers: Any) -> int | None:
        with lock:
            if not first:
                first.append(time.monotonic())
            elapsed = time.monotonic() - first[0]
        for status, seconds in phases:
            if elapsed < seconds:
                return status
            elapsed -= seconds
        return None

    return respond


# -- 1. a sink answering 404 / 401 / 400 to everything for a while --------------------------------


# (status, processes, what the log must show besides the circuit opening)
ANSWERS = {
    404: ("2", None),
    401: ("2", "refuses the poller's credentials"),
    # REFUSAL_RUN (10 different events refused alike) is counted per worker process: one process
    # gets all 40 messages at once, so it sees ten refusals before the first one's deadline.
    400: ("1", "taken for a problem of the sink"),
}


@pytest.mark.parametrize("status", sorted(ANSWERS, reverse=True))
def test_sink_answering_an_error_to_every_event(
    status: int, sqs: Any, make_queue: Any, start_poller: Callable[..., PollerProcess],
    fault_case: Callable[..., FaultCase],
) -> None:
    """For 3 s from its first request the sink answers ``status`` to every event, then 200. The
    queue's DLQ takes a message at its third receive (maxReceiveCount 2) and the visibility
    timeout is 3 s: a message wrongly rejected or returned twice would be in the DLQ within
    seconds, once would be delivered at its second receive. The answer is the sink's problem, not
    the events': the circuit opens (receiving pauses, the held messages are kept invisible and
    probed one at a time), everything is delivered once the sink answers 200, each message at its
    first receive, nothing is in the DLQ. Duplicates: 0 (the dumper keeps only the events it
    answered 2xx, and nothing was given back)."""
    processes, logged = ANSWERS[status]
    case = fault_case(f"sink answering {status} to every event 3 s", "http", max_duplicates=0)
    queue = make_queue(visibility_timeout=3, dlq_max_receive_count=2)
    with dumper_sink(respond=answering((status, 3.0))) as server:
        deliveries = SinkDeliveries(server)
        ids = send_messages(sqs, queue.url, [f"answer-{status}-{i}" for i in range(40)])
        case.count_with(lambda wait: tally(sqs, ids, deliveries, wait=wait, dlq_url=queue.dlq_url))
        poller = start_poller(queue.url, deliveries.poller_args(), "--processes", processes, *SHORT_DEADLINES)
        wait_empty(sqs, queue.url, 60)
        assert poller.stop() == 0, poller.log_text()[-3000:]
    text = poller.log_text()
    refused = server.counts.refused
    case.note(f"sink answered {status} to {refused} events")
    assert refused >= 5, "the sink hardly refused anything: the fault did not hit"
    assert "circuit open:" in text, text[-3000:]
    if logged is not None:
        times = text.count(logged)
        assert 1 <= times <= int(processes), f"{logged!r} logged {times} times:\n{text[-3000:]}"
    counts = receive_counts(server)
    case.note("delivered at receive " + ", ".join(f"#{n}: {k}" for n, k in sorted(counts.items())))
    result = case.finish()
    case.note(f"DLQ: {len(result.dead)}")
    assert not result.dead, f"{len(result.dead)} healthy messages in the DLQ: {sorted(result.dead)[:5]}"
    # A pause, not a stream of nacks: no message was received twice.
    assert set(counts) == {1}, f"receive counts grew during the outage: {dict(counts)}\n{text[-3000:]}"


def test_sink_answering_400_to_a_probe(
    sqs: Any, make_queue: Any, start_poller: Callable[..., PollerProcess], fault_case: Callable[..., FaultCase],
) -> None:
    """From its first request the sink answers 503 to every event for 2 s, then 400 to every event
    for 6 s, then 200 (a sink that comes back broken, then is fixed). One process, 20 messages:
    the 503s open the circuit; its probes, one at a time, then meet the 400s. Every answer is the
    sink's problem, not the events': nothing may be rejected for it, the receive counts must not
    grow, nothing is in the DLQ (maxReceiveCount 2). Duplicates: 0.

    Failed at e0cf4cb: the first probe that meets a 400 is alone (the circuit lets one probe out
    at a time), so the ten different refusals that make a 400 the sink's problem cannot come
    together; the refusal was held for --http-timeout, then confirmed as a REJECT of that healthy
    message, and the REJECT closed the circuit ("the channel delivers again") though the sink
    accepted nothing. The message came back at its second receive (with maxReceiveCount 1 it
    would have been in the DLQ). Now a refusal from a sink whose last other answer was a failure
    is retried at its deadline, not rejected."""
    case = fault_case("sink answering 503 2 s, then 400 6 s (probes refused)", "http", max_duplicates=0)
    queue = make_queue(visibility_timeout=3, dlq_max_receive_count=2)
    with dumper_sink(respond=answering((503, 2.0), (400, 6.0))) as server:
        deliveries = SinkDeliveries(server)
        ids = send_messages(sqs, queue.url, [f"probe-400-{i}" for i in range(20)])
        case.count_with(lambda wait: tally(sqs, ids, deliveries, wait=wait, dlq_url=queue.dlq_url))
        poller = start_poller(queue.url, deliveries.poller_args(), "--processes", "1", *SHORT_DEADLINES)
        wait_empty(sqs, queue.url, 60)
        assert poller.stop() == 0, poller.log_text()[-3000:]
    text = poller.log_text()
    rejected = [line for line in text.splitlines() if "rejected message" in line]
    counts = receive_counts(server)
    case.note(f"sink refused {server.counts.refused} events; {len(rejected)} rejected by the poller; delivered at "
              "receive " + ", ".join(f"#{n}: {k}" for n, k in sorted(counts.items())))
    assert "circuit open:" in text and server.counts.refused, text[-3000:]
    result = case.finish()
    case.note(f"DLQ: {len(result.dead)}")
    assert not result.dead, f"{len(result.dead)} healthy messages in the DLQ: {sorted(result.dead)[:5]}"
    assert not rejected, f"healthy messages rejected while the sink answered 400 to everything: {rejected}"
    assert set(counts) == {1}, f"receive counts grew while the sink refused everything: {dict(counts)}"


# -- 2. batch mode into a sink with a body limit, and into the in-memory channel ------------------


class BatchCountingDumper(DumperServer):
    """The dumper, also counting the events of each request it took (the 413s are answered by the
    server's body limit before this: they never get here)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.batch_sizes: Counter[int] = Counter()
        self._sizes_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def handle(self, headers: dict[str, str], body: bytes) -> Any:
        reply = super().handle(headers, body)
        with self._sizes_lock:
            self.batch_sizes[len(orjson.loads(body)) if body.startswith(b"[") else 1] += 1
        return reply


def test_batches_above_the_sinks_body_limit(
    sqs: Any, make_queue: Any, start_poller: Callable[..., PollerProcess], fault_case: Callable[..., FaultCase],
) -> None:
    """--http-mode batch into a sink that answers 413 to any request above 48 KiB; 40 messages of
    30 KB, so a batch of two is already too large and every event fits alone. A refused batch
    is split in halves down to the single event: everything is delivered, one event per
    request, nothing is in the DLQ (maxReceiveCount 2). Duplicates: 0."""
    case = fault_case("batch mode, sink refusing > 48 KiB with 413", "http", max_duplicates=0)
    queue = make_queue(visibility_timeout=10, dlq_max_receive_count=2)
    with open(os.devnull, "w") as devnull, BatchCountingDumper(
            "127.0.0.1", 0, out=devnull, keep=True, server_options=ServerOptions(max_body=48 * 1024)) as server:
        deliveries = SinkDeliveries(server)
        ids = send_messages(sqs, queue.url, [f"big-{i}-" + "x" * 30_000 for i in range(40)])
        case.count_with(lambda wait: tally(sqs, ids, deliveries, wait=wait, dlq_url=queue.dlq_url))
        # DEBUG: the channel logs each batch refused and split
        poller = start_poller(queue.url, deliveries.poller_args(), "--http-mode", "batch", "--http-timeout", "10",
                              "--max-processing-time", "15", "--log-level", "DEBUG")
        wait_empty(sqs, queue.url, 60)
        assert poller.stop() == 0, poller.log_text()[-3000:]
    splits = poller.log_text().count("with HTTP 413: sending it again in halves")
    case.note(f"{splits} batches refused with 413 and split; requests taken, by events in them: "
              f"{dict(sorted(server.batch_sizes.items()))}")
    assert splits >= 4, "hardly a batch was refused: the fault did not hit"
    assert set(server.batch_sizes) == {1}, "a request above the limit was taken"
    result = case.finish()
    case.note(f"DLQ: {len(result.dead)}")
    assert not result.dead, f"{len(result.dead)} messages in the DLQ: {sorted(result.dead)[:5]}"


def test_batches_into_the_in_memory_channel(
    sqs: Any, make_queue: Any, start_poller: Callable[..., PollerProcess], fault_case: Callable[..., FaultCase],
) -> None:
    """--http-mode batch into ``poller channel`` (the in-memory channel) in front of a dumper: the
    channel takes batched content mode, fans each event out on its own and answers the batch;
    everything reaches the dumper, nothing is in the DLQ (maxReceiveCount 2). Duplicates: 0."""
    case = fault_case("batch mode into the in-memory channel", "http", max_duplicates=0)
    queue = make_queue(visibility_timeout=5, dlq_max_receive_count=2)
    with dumper_sink() as server, InMemoryChannelServer("127.0.0.1", 0, [server.url]) as channel:
        deliveries = SinkDeliveries(server, channel.url)
        ids = send_messages(sqs, queue.url, [f"channel-batch-{i}" for i in range(20)])
        case.count_with(lambda wait: tally(sqs, ids, deliveries, wait=wait, dlq_url=queue.dlq_url))
        poller = start_poller(queue.url, deliveries.poller_args(), "--http-mode", "batch", *SHORT_DEADLINES)
        wait_empty(sqs, queue.url, 60)
        assert poller.stop() == 0, poller.log_text()[-3000:]
        counts = channel.counts
    case.note(f"channel: received {counts.received}, delivered {counts.delivered}, invalid {counts.invalid}")
    result = case.finish()
    case.note(f"DLQ: {len(result.dead)}")
    assert not result.dead, f"{len(result.dead)} messages in the DLQ: {sorted(result.dead)[:5]}"


# -- 3. a 2xx answer with a huge body ----------------------------------------------------------------

HUGE_ANSWER = 200 * 1024 * 1024
_CHUNK = 1024 * 1024


class _HugeAnswerHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: HugeAnswerSink

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        events = orjson.loads(body)
        self.server.accepted([str(e["id"]) for e in (events if isinstance(events, list) else [events])])
        # A valid answer that lists no failure, whitespace after it: 200 MiB, written as it goes.
        head = b'{"batchItemFailures":[]}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(HUGE_ANSWER))
        self.end_headers()
        padding = b" " * _CHUNK
        try:
            self.wfile.write(head)
            left = HUGE_ANSWER - len(head)
            while left > 0:
                self.wfile.write(padding[:left])
                left -= min(left, _CHUNK)
        except OSError:  # the client stopped reading: what the fix does past 1 MiB
            self.server.cut()
            self.close_connection = True
            return
        self.server.finished()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


class HugeAnswerSink(ThreadingHTTPServer):
    """Answers every request 200 with a 200 MiB body (streamed, never held), after recording the
    event ids of the request: when the poller sees the 200, the events are already recorded."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _HugeAnswerHandler)
        self._lock = threading.Lock()
        self.ids: Counter[str] = Counter()
        self.requests = self.answers_cut = self.answers_whole = 0
        self._thread = threading.Thread(target=self.serve_forever, name="huge-answer-sink", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"

    def accepted(self, ids: list[str]) -> None:
        with self._lock:
            self.ids.update(ids)
            self.requests += 1

    def cut(self) -> None:
        with self._lock:
            self.answers_cut += 1

    def finished(self) -> None:
        with self._lock:
            self.answers_whole += 1

    def __enter__(self) -> HugeAnswerSink:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()
        self.server_close()


class HugeAnswerDeliveries:
    """``Deliveries`` for the huge-answer sink (batch mode)."""

    channel = "http"

    def __init__(self, sink: HugeAnswerSink) -> None:
        self.sink = sink

    def poller_args(self) -> list[str]:
        return ["--channel", "http", "--sink", self.sink.url, "--http-mode", "batch"]

    def ids(self, expected: Collection[str] = (), timeout: float = 60) -> Counter[str]:
        deadline = time.monotonic() + timeout
        while set(expected) - set(self._ids()) and time.monotonic() < deadline:
            time.sleep(0.2)
        return self._ids()

    def _ids(self) -> Counter[str]:
        with self.sink._lock:
            return Counter(self.sink.ids)


def vm_rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


@contextmanager
def rss_watch(poller: PollerProcess, every: float = 0.05) -> Iterator[dict[int, float]]:
    """The highest VmRSS (MiB) of each worker process seen while the block runs."""
    peaks: dict[int, float] = {}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for pid in poller.worker_pids():
                rss = vm_rss_mib(pid)
                if rss is not None:
                    peaks[pid] = max(peaks.get(pid, 0.0), rss)
            done.wait(every)

    thread = threading.Thread(target=watch, name="rss-watch", daemon=True)
    thread.start()
    try:
        yield peaks
    finally:
        done.set()
        thread.join()


RSS_LIMIT_MIB = 150


def test_batch_answer_with_a_huge_body(
    sqs: Any, make_queue: Any, start_poller: Callable[..., PollerProcess], fault_case: Callable[..., FaultCase],
) -> None:
    """--http-mode batch into a sink that answers every batch 200 with a 200 MiB body: the poller
    reads an answer's body up to 1 MiB (for batchItemFailures) and no further. Everything is
    delivered and each worker's RSS stays under 150 MiB throughout. Duplicates: 0 (the sink
    records a batch before it answers, and a 200 acks it whatever the body)."""
    case = fault_case("batch mode, 2xx answers of 200 MiB", "http", max_duplicates=0)
    queue = make_queue(visibility_timeout=10)
    with HugeAnswerSink() as sink:
        deliveries = HugeAnswerDeliveries(sink)
        ids = send_messages(sqs, queue.url, [f"huge-answer-{i}" for i in range(60)])
        case.count_with(lambda wait: tally(sqs, ids, deliveries, wait=wait))
        poller = start_poller(queue.url, deliveries.poller_args(), "--http-timeout", "10",
                              "--max-processing-time", "15")
        poller.wait_for_workers(2)
        with rss_watch(poller) as peaks:
            wait_empty(sqs, queue.url, 60)
        assert poller.stop() == 0, poller.log_text()[-3000:]
    case.note(f"{sink.requests} requests, {sink.answers_cut} answers cut off by the poller, "
              f"{sink.answers_whole} read whole; worker RSS peaks "
              + ", ".join(f"{rss:.0f}" for rss in sorted(peaks.values())) + " MiB")
    assert sink.requests >= 2, "the sink hardly answered: the fault did not hit"
    assert len(peaks) >= 2, f"RSS of the workers not read: {peaks}"
    assert max(peaks.values()) < RSS_LIMIT_MIB, f"a worker's RSS reached {max(peaks.values()):.0f} MiB"
    case.finish()


# -- 4. congestion on a slow sink -------------------------------------------------------------------


def test_congestion_on_a_slow_sink(
    sqs: Any, make_queue: Any, start_poller: Callable[..., PollerProcess], fault_case: Callable[..., FaultCase],
) -> None:
    """The sink takes 0.3 s per request; one process, one connection, 20 messages in flight and
    --http-timeout 2: most requests wait behind the connection longer than their deadline. A
    request whose deadline passed while it waited is never written, so the sink gets each
    message about once: the requests it receives are at most the messages plus 10 (a request
    written near the end of its deadline and given up mid-answer is received once more later).
    Nothing is in the DLQ (maxReceiveCount 2). Duplicates <= 10, the same bound."""
    extra_requests = 10
    n = 40
    case = fault_case("slow sink (0.3 s), 1 connection, 20 in flight", "http", max_duplicates=extra_requests)
    queue = make_queue(visibility_timeout=5, dlq_max_receive_count=2)
    with dumper_sink(respond=lambda event, headers: time.sleep(0.3)) as server:
        deliveries = SinkDeliveries(server)
        ids = send_messages(sqs, queue.url, [f"congested-{i}" for i in range(n)])
        case.count_with(lambda wait: tally(sqs, ids, deliveries, wait=wait, dlq_url=queue.dlq_url))
        poller = start_poller(queue.url, deliveries.poller_args(), "--processes", "1", "--http-concurrency", "1",
                              "--max-in-flight", "20", *SHORT_DEADLINES, *QUICK_NACKS)
        wait_empty(sqs, queue.url, 90)
        assert poller.stop() == 0, poller.log_text()[-3000:]
    requests = server.counts.received
    case.note(f"sink received {requests} requests for {n} messages")
    assert requests <= n + extra_requests, f"the sink received {requests} requests for {n} messages"
    result = case.finish()
    case.note(f"DLQ: {len(result.dead)}")
    assert not result.dead, f"{len(result.dead)} delivered messages in the DLQ: {sorted(result.dead)[:5]}"


# -- 5. a sink that accepts and never answers ---------------------------------------------------------


def test_stalled_sink(
    sqs: Any, make_queue: Any, start_poller: Callable[..., PollerProcess], fault_case: Callable[..., FaultCase],
) -> None:
    """For 8 s the sink accepts connections and requests and never answers (the fault proxy's
    stall), then is healthy; --http-timeout 2. The requests time out, the circuit opens, its
    probes time out and are parked again; once the sink answers, a probe gets through, the
    circuit closes and everything is delivered. Duplicates: 0 (nothing reached the sink during
    the stall)."""
    case = fault_case("stalled sink 8 s", "http", max_duplicates=0)
    queue = make_queue(visibility_timeout=5, dlq_max_receive_count=3)
    with dumper_sink() as server, FaultProxy(server.url) as proxy:
        deliveries = SinkDeliveries(server, proxy.url)
        poller = start_poller(queue.url, deliveries.poller_args(), *SHORT_DEADLINES)
        poller.wait_for_workers(2)
        proxy.set(Fault.STALL)
        stall_ends = time.monotonic() + 8
        ids = send_messages(sqs, queue.url, [f"stalled-{i}" for i in range(20)])

        def count(wait: float) -> Tally:
            if proxy.current is not Fault.PASS:  # a case that failed mid-stall is counted too
                proxy.clear()
            return tally(sqs, ids, deliveries, wait=wait, dlq_url=queue.dlq_url)

        case.count_with(count)
        wait_until(lambda: "circuit open:" in poller.log_text(), 8, "the circuit to open")
        time.sleep(max(0.0, stall_ends - time.monotonic()))
        stalled = proxy.stats().stalled
        assert not server.events, "events reached the sink during the stall"
        proxy.clear()
        wait_empty(sqs, queue.url, 60)
        assert poller.stop() == 0, poller.log_text()[-3000:]
    text = poller.log_text()
    probes = text.count("probing the channel")
    case.note(f"{stalled} connections stalled, {probes} probes")
    assert probes >= 2, f"{probes} probes: the circuit's probing was not exercised\n{text[-3000:]}"
    assert "circuit closed" in text, text[-3000:]
    result = case.finish()
    assert not result.dead, f"{len(result.dead)} messages in the DLQ: {sorted(result.dead)[:5]}"


def test_max_processing_time_must_exceed_the_http_timeout(make_queue: Any, aws_env: dict[str, str]) -> None:
    """``--max-processing-time 3`` with ``--http-timeout 120`` is refused at start: exit 2, one
    line naming --max-processing-time (else a working but slow attempt is given up while its
    request may still reach the sink)."""
    queue = make_queue()
    proc = subprocess.run(
        [sys.executable, "-m", "poller", "run", "--queue-url", queue.url, "--channel", "http",
         "--sink", "http://127.0.0.1:9/", "--http-timeout", "120", "--max-processing-time", "3"],
        env={**os.environ, **aws_env}, capture_output=True, text=True, timeout=60,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("poller: error: ") and "--max-processing-time" in lines[0], lines[0]
