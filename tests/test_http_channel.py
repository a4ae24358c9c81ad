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
from poller.kit.dumper import DumperServer
from channels.http import HttpConfig, basic_auth, redact
from support import silent_server

SOURCE = "https://sqs.us-east-1.amazonaws.com/123456789012/q"


def on_loop(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


class Reports:
    def __init__(self) -> None:
        self.items: list[tuple[str, Outcome, str]] = []
        self.retry_after: list[float] = []

    def __call__(self, message: Message, outcome: Outcome, reason: str, retry_after: float = 0.0) -> None:
        self.items.append((message.id, outcome, reason))
        self.retry_after.append(retry_after)

    async def wait(self, n: int, timeout: float = 10.0) -> list[tuple[str, Outcome, str]]:
        deadline = time.monotonic() + timeout
        while len(self.items) < n:
            assert time.monotonic() < deadline, f"only {len(self.items)} of {n} reports: {self.items}"
            await asyncio.sleep(0.01)
        return list(self.items)


def message(i: int) -> Message:
    return Message(id=f"m-{i}", body=f"body {i}", ack_id=f"rh-{i}",
                   attributes={"SentTimestamp": "1700000000000"})


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
    answers = {"m-0": 200, "m-1": 400, "m-2": 429, "m-3": 503, "m-4": 408, "m-5": 301}
    with dumper(respond=lambda event, headers: answers[event["id"]]) as d:
        channel = HttpConfig(sink=d.url, concurrency=4).create(SOURCE)
        reports = Reports()
        channel.publish([message(i) for i in range(6)], reports)
        await reports.wait(6)
        await channel.aclose(5)
    assert {i: o for i, o, _ in reports.items} == {
        "m-0": Outcome.ACK, "m-1": Outcome.REJECT, "m-2": Outcome.RETRY, "m-3": Outcome.RETRY,
        "m-4": Outcome.RETRY, "m-5": Outcome.REJECT}


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


@pytest.mark.parametrize(("status", "expected"), [(503, Outcome.RETRY), (400, Outcome.REJECT), (200, Outcome.ACK)])
@on_loop
async def test_a_batch_without_item_failures_is_all_or_nothing(status: int, expected: Outcome) -> None:
    sink = BatchSink(lambda ids: (status, b"not the batchItemFailures shape"))
    reports = await _batch_run(sink, 4)
    assert {o for _, o, _ in reports.items} == {expected}
