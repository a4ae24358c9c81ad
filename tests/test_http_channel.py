"""channels.http.HttpChannel on a real event loop against real local servers: one attempt per
message, credentials in the sink URL, what logs may show of the sink, Retry-After, a close that
keeps its deadline, many requests in flight."""

from __future__ import annotations

import asyncio
import base64
import functools
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import orjson
import pytest

from channels.base import Message, Outcome
from channels.http import HttpConfig, basic_auth, redact
from poller.kit.dumper import DumperServer

from support import Reports, message, silent_server

SOURCE = "https://sqs.us-east-1.amazonaws.com/123456789012/q"


def on_loop(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


@contextmanager
def dumper(**kwargs: Any) -> Iterator[DumperServer]:
    with open(os.devnull, "w") as devnull, DumperServer("127.0.0.1", 0, out=devnull, keep=True, **kwargs) as d:
        yield d


@on_loop
async def test_credentials_in_the_sink_url_are_sent_as_basic_auth() -> None:
    with dumper() as d:
        sink = d.url.replace("http://", "http://us%40er:p%3Ass word@")
        channel = HttpConfig(sink=sink, concurrency=1).create(SOURCE)
        channel.start()
        reports = Reports()
        try:
            channel.publish([message(1)], reports)
            assert (await reports.wait(1))[0][1] is Outcome.ACK
        finally:
            await channel.aclose(5)
        sent = d.received[0].headers["authorization"]
    assert sent == "Basic " + base64.b64encode(b"us@er:p:ss word").decode()


@on_loop
async def test_no_userinfo_no_authorization() -> None:
    assert basic_auth("http://example.com/") is None
    with dumper() as d:
        channel = HttpConfig(sink=d.url, concurrency=1).create(SOURCE)
        reports = Reports()
        channel.publish([message(1)], reports)
        await reports.wait(1)
        await channel.aclose(5)
        assert "authorization" not in d.received[0].headers


@pytest.mark.parametrize(("url", "shown"), [
    ("https://user:secret@sink.example.com:8443/path?token=abc&x=1",
     "https://sink.example.com:8443/path?token=***&x=***"),
    ("http://sink/?secret", "http://sink/?secret=***"),
    ("http://:pw@sink/", "http://sink/"),
    ("http://sink/plain", "http://sink/plain"),
])
def test_redact_drops_userinfo_and_query_values(url: str, shown: str) -> None:
    assert redact(url) == shown


@on_loop
async def test_a_failure_reason_never_shows_the_credentials() -> None:
    with dumper(respond=lambda event, headers: 503) as d:
        sink = d.url.replace("http://", "http://user:hunter2@") + "?token=t0ps3cret"
        channel = HttpConfig(sink=sink, concurrency=1).create(SOURCE)
        reports = Reports()
        channel.publish([message(1)], reports)
        (_, outcome, reason), = await reports.wait(1)
        await channel.aclose(5)
    assert outcome is Outcome.RETRY and "503" in reason
    assert "hunter2" not in reason and "t0ps3cret" not in reason and "user" not in reason
    assert "hunter2" not in repr(HttpConfig(sink=sink))


@on_loop
async def test_one_attempt_per_publish_the_worker_retries() -> None:
    with dumper(respond=lambda event, headers: 500) as d:
        channel = HttpConfig(sink=d.url, concurrency=2).create(SOURCE)
        reports = Reports()
        channel.publish([message(i) for i in range(3)], reports)
        outcomes = await reports.wait(3)
        await channel.aclose(5)
        assert {o for _, o, _ in outcomes} == {Outcome.RETRY}
        assert d.counts.refused == 3  # exactly one request per message


@on_loop
async def test_statuses_decide_the_outcome() -> None:
    """Knative's table, with "not retried" meaning the DLQ for us: only what is about the one event
    refuses it; the endpoint's or the credentials' problems (3xx, 401, 403, 404, 405, 407, 409,
    410) are retried, never rejected."""
    answers = {"m-0": 200, "m-1": 400, "m-2": 429, "m-3": 503, "m-4": 408, "m-5": 301, "m-6": 401,
               "m-7": 403, "m-8": 404, "m-9": 409, "m-10": 405, "m-11": 407, "m-12": 410, "m-13": 413,
               "m-14": 415, "m-15": 422, "m-16": 431, "m-17": 202}
    # One request at a time, so the answers come in this order and the last one, a 2xx, confirms
    # every refusal held before it. With four in flight the order was a race (it failed now and
    # then under load): a refusal answered after m-17's 2xx waited for its deadline, and was
    # retried if a failure (a 4xx/5xx to retry) had been answered after that 2xx.
    with dumper(respond=lambda event, headers: answers[event["id"]]) as d:
        channel = HttpConfig(sink=d.url, concurrency=1, timeout=10.0).create(SOURCE)
        reports = Reports()
        channel.publish([message(i) for i in range(18)], reports)
        await reports.wait(18)
        await channel.aclose(5)
    refused = {"m-1", "m-13", "m-14", "m-15", "m-16"}
    acked = {"m-0", "m-17"}
    assert {i: o for i, o, _ in reports.items} == {
        i: Outcome.ACK if i in acked else Outcome.REJECT if i in refused else Outcome.RETRY for i in answers}


@on_loop
async def test_a_refusal_waits_for_a_2xx_that_shows_the_sink_works() -> None:
    """A 400 alone is not yet a verdict on the event: it is reported once the sink accepted
    another event; never later than the attempt's deadline."""
    with dumper(respond=lambda event, headers: 400 if event["id"] == "m-1" else 200) as d:
        channel = HttpConfig(sink=d.url, concurrency=2, timeout=10.0).create(SOURCE)
        reports = Reports()
        channel.publish([message(1)], reports)
        await asyncio.sleep(0.5)
        assert reports.items == [] and d.counts.refused == 1  # answered, held
        channel.publish([message(2)], reports)
        outcomes = await reports.wait(2)
        await channel.aclose(5)
    assert dict((i, o) for i, o, _ in outcomes) == {"m-1": Outcome.REJECT, "m-2": Outcome.ACK}

    with dumper(respond=lambda event, headers: 422) as d:
        channel = HttpConfig(sink=d.url, concurrency=2, timeout=0.5).create(SOURCE)
        reports = Reports()
        started = time.monotonic()
        channel.publish([message(1)], reports)
        (_, outcome, reason), = await reports.wait(1)
        assert outcome is Outcome.REJECT and "422" in reason
        assert 0.4 < time.monotonic() - started < 3  # at the attempt's deadline, not before
        await channel.aclose(5)


@on_loop
async def test_a_refusal_from_a_failing_sink_is_not_a_verdict_at_the_deadline() -> None:
    """A sink back from an outage in a bad state (503, then 400 to all): the circuit's lone probe
    is refused, nothing confirms it; at the deadline it is retried, not rejected (else each probe
    in turn was rejected and closed the circuit)."""
    answers = {"m-1": 503, "m-2": 400}
    with dumper(respond=lambda event, headers: answers[event["id"]]) as d:
        channel = HttpConfig(sink=d.url, concurrency=1, timeout=0.5).create(SOURCE)
        reports = Reports()
        channel.publish([message(1)], reports)
        await reports.wait(1)
        channel.publish([message(2)], reports)
        outcomes = await reports.wait(2)
        await channel.aclose(5)
    assert outcomes[1][:2] == ("m-2", Outcome.RETRY) and "while it was failing" in outcomes[1][2]


@on_loop
async def test_the_same_refusal_for_many_different_events_is_the_sinks_problem() -> None:
    """A sink answering 400 to everything (a wrong endpoint, a broken deploy) must not send a
    backlog to the DLQ: REFUSAL_RUN different events refused alike are retried, and so is every
    later one, until the sink accepts an event; then refusals are about events again."""
    from channels.http import REFUSAL_RUN

    broken = [True]
    with dumper(respond=lambda event, headers: 400 if broken[0] or event["id"] == "m-99" else 200) as d:
        channel = HttpConfig(sink=d.url, concurrency=4, timeout=30).create(SOURCE)
        reports = Reports()
        n = REFUSAL_RUN + 5
        channel.publish([message(i) for i in range(n)], reports)
        outcomes = await reports.wait(n, timeout=10)  # long before the 30 s deadline
        assert {o for _, o, _ in outcomes} == {Outcome.RETRY}
        assert all("problem of the sink" in r for _, _, r in outcomes)
        broken[0] = False
        channel.publish([message(99)], reports)  # still a problem of the sink: retried
        await reports.wait(n + 1)
        assert reports.items[-1][1] is Outcome.RETRY
        channel.publish([message(100)], reports)  # the sink works again
        await reports.wait(n + 2)
        channel.publish([message(99)], reports)  # now its refusal is about it
        await asyncio.sleep(0.3)  # answered and held: the 2xx that confirms it must come after
        channel.publish([message(101)], reports)
        await reports.wait(n + 4)
        await channel.aclose(5)
    last = {i: o for i, o, _ in reports.items[n + 1:]}
    assert last == {"m-100": Outcome.ACK, "m-99": Outcome.REJECT, "m-101": Outcome.ACK}


@on_loop
async def test_credentials_refused_are_retried_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    with dumper(respond=lambda event, headers: 401) as d:
        channel = HttpConfig(sink=d.url, concurrency=4).create(SOURCE)
        reports = Reports()
        channel.publish([message(i) for i in range(20)], reports)
        outcomes = await reports.wait(20)
        await channel.aclose(5)
    assert {o for _, o, _ in outcomes} == {Outcome.RETRY}
    lines = [r for r in caplog.records if "refuses the poller's credentials" in r.getMessage()]
    assert len(lines) == 1


@on_loop
async def test_retry_after_of_a_429_is_passed_on() -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        channel = HttpConfig(sink=f"http://127.0.0.1:{port}/", concurrency=1).create(SOURCE)
        reports = Reports()
        channel.publish([message(1)], reports)
        (_, outcome, reason), = await reports.wait(1)
        await channel.aclose(5)
    assert outcome is Outcome.RETRY and "429" in reason and reports.retry_after == [7.0]


@on_loop
async def test_hundreds_in_flight_on_few_connections() -> None:
    with dumper() as d:
        channel = HttpConfig(sink=d.url, concurrency=8).create(SOURCE)
        reports = Reports()
        channel.publish([message(i) for i in range(300)], reports)
        outcomes = await reports.wait(300, timeout=30)
        await channel.aclose(5)
    assert {o for _, o, _ in outcomes} == {Outcome.ACK}
    assert len({e["id"] for e in d.events}) == 300


@on_loop
async def test_a_trickling_answer_is_cut_at_the_timeout() -> None:
    """A sink that answers one byte at a time must not hold a message past --http-timeout."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    stop = threading.Event()

    def trickle() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                conn.recv(65536)
                for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 100000:
                    if stop.is_set():
                        break
                    try:
                        conn.sendall(bytes([byte]))
                    except OSError:
                        break
                    time.sleep(0.05)

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        channel = HttpConfig(sink=f"http://127.0.0.1:{server.getsockname()[1]}/", concurrency=1,
                             timeout=1.0).create(SOURCE)
        reports = Reports()
        channel.publish([message(1)], reports)
        (_, outcome, reason), = await reports.wait(1, timeout=15)
        assert outcome is Outcome.RETRY and "Timeout" in reason
        await channel.aclose(5)
    finally:
        stop.set()
        thread.join(5)
        server.close()


@on_loop
async def test_aclose_keeps_its_deadline_with_every_request_stuck_and_reports_everything() -> None:
    with silent_server() as address:
        channel = HttpConfig(sink=f"http://{address}/", concurrency=4, timeout=600).create(SOURCE)
        reports = Reports()
        channel.publish([message(i) for i in range(10)], reports)
        await asyncio.sleep(0.3)  # every request is now waiting for an answer that never comes
        # The requests' own deadline is 600 s: only aclose's can end this wait in time.
        await asyncio.wait_for(channel.aclose(1.0), 30)
        outcomes = await reports.wait(10, timeout=1)
    assert sorted(i for i, _, _ in outcomes) == sorted(f"m-{i}" for i in range(10))
    assert {o for _, o, _ in outcomes} == {Outcome.RETRY}


class BatchSink:
    """A CloudEvents batch sink on the loop: parses each batch with the cloudevents SDK, records
    the ids, and answers with ``answer(ids)`` -> (status, body)."""

    def __init__(self, answer: Callable[[list[str]], tuple[int, bytes]]) -> None:
        self.answer = answer
        self.batches: list[list[str]] = []
        self.content_types: list[str] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from cloudevents.core.formats.json import JSONFormat

        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:] if line)
            body = await reader.readexactly(int(headers["Content-Length"]))
            self.content_types.append(headers["Content-Type"])
            # The SDK has no batch reader: each element must be a structured event it can read.
            ids = [JSONFormat().read(None, orjson.dumps(doc)).get_id() for doc in orjson.loads(body)]
            self.batches.append(ids)
            status, answer = self.answer(ids)
            writer.write(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (status, len(answer), answer))
            await writer.drain()
        writer.close()


async def _batch_run(sink: BatchSink, n: int, batch_size: int = 4) -> Reports:
    server = await asyncio.start_server(sink.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        channel = HttpConfig(sink=f"http://127.0.0.1:{port}/", mode="batch", batch_size=batch_size,
                             concurrency=2).create(SOURCE)
        reports = Reports()
        for i in range(n):  # one message per publish, as the worker hands them over
            channel.publish([message(i)], reports)
        await reports.wait(n)
        await channel.aclose(5)
    return reports


@on_loop
async def test_batch_mode_sends_up_to_batch_size_events_per_request() -> None:
    sink = BatchSink(lambda ids: (200, b""))
    reports = await _batch_run(sink, 10, batch_size=4)
    assert [len(b) for b in sink.batches] == [4, 4, 2]  # the last one after the linger
    assert sorted(i for b in sink.batches for i in b) == sorted(f"m-{i}" for i in range(10))
    assert set(sink.content_types) == {"application/cloudevents-batch+json; charset=utf-8"}
    assert {o for _, o, _ in reports.items} == {Outcome.ACK}


@on_loop
async def test_batch_item_failures_retry_only_those_events() -> None:
    sink = BatchSink(lambda ids: (200, orjson.dumps({"batchItemFailures": [
        {"itemIdentifier": i} for i in ids if i in ("m-1", "m-6")]})))
    reports = await _batch_run(sink, 8)
    outcome = {i: o for i, o, _ in reports.items}
    assert {i for i, o in outcome.items() if o is Outcome.RETRY} == {"m-1", "m-6"}
    assert sum(o is Outcome.ACK for o in outcome.values()) == 6


@pytest.mark.parametrize(("status", "expected"), [(503, Outcome.RETRY), (404, Outcome.RETRY), (200, Outcome.ACK)])
@on_loop
async def test_a_batch_without_item_failures_is_all_or_nothing(status: int, expected: Outcome) -> None:
    sink = BatchSink(lambda ids: (status, b"not the batchItemFailures shape"))
    reports = await _batch_run(sink, 4)
    assert {o for _, o, _ in reports.items} == {expected}
    assert len(sink.batches) == 1


@on_loop
async def test_a_refused_batch_is_split_until_each_event_fits_or_is_refused_alone() -> None:
    """A sink that refuses requests above its size limit (413) takes every event that fits alone:
    the batch is sent again in halves, down to the one event refused alone (seen before: ~30 KB
    events, a 48 KiB limit, every one in the DLQ)."""
    sizes: dict[str, int] = {}

    def answer(ids: list[str]) -> tuple[int, bytes]:
        too_big = sum(sizes[i] for i in ids) > 2500 or "m-5" in ids
        return (413, b"") if too_big else (200, b"")

    sink = BatchSink(answer)
    server = await asyncio.start_server(sink.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        channel = HttpConfig(sink=f"http://127.0.0.1:{port}/", mode="batch", batch_size=8,
                             concurrency=2, timeout=2.0).create(SOURCE)
        reports = Reports()
        batch = []
        for i in range(8):
            m = Message(id=f"m-{i}", body="x" * 900, ack_id=f"rh-{i}", attributes={"SentTimestamp": "1700000000000"})
            sizes[m.id] = 900
            batch.append(m)
        channel.publish(batch, reports)
        outcomes = await reports.wait(8, timeout=10)
        await channel.aclose(5)
    outcome = {i: o for i, o, _ in outcomes}
    assert outcome.pop("m-5") is Outcome.REJECT
    assert set(outcome.values()) == {Outcome.ACK}
    # 8 -> 4 + 4 -> 2 + 2 + 2 + 2 (fit, but the one holding m-5) -> 1 + 1
    assert [len(b) for b in sink.batches].count(1) == 2 and len(sink.batches) == 9
    assert ["m-5"] in sink.batches


@on_loop
async def test_a_batch_answer_body_is_read_only_up_to_a_bound() -> None:
    """A 2xx answer of many MiB is not kept (a 300 MiB one grew a worker by 900 MiB): it lists no
    failures, and the status decides."""
    from channels.http import MAX_BATCH_ANSWER

    huge = b"[" + b" " * (MAX_BATCH_ANSWER + 10) + b"]"
    sink = BatchSink(lambda ids: (200, huge))
    reports = await _batch_run(sink, 4)
    assert {o for _, o, _ in reports.items} == {Outcome.ACK}
