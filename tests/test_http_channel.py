"""channels.http.HttpChannel against real local servers: one attempt per message, credentials in
the sink URL, what logs may show of the sink, a close that keeps its deadline, ``stalled()``."""

from __future__ import annotations

import base64
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from channels.base import Message, Outcome
from channels.dumper import DumperServer
from channels.http import HttpConfig, basic_auth, redact
from support import silent_server

SOURCE = "https://sqs.us-east-1.amazonaws.com/123456789012/q"


class Reports:
    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.items: list[tuple[str, Outcome, str]] = []

    def __call__(self, message: Message, outcome: Outcome, reason: str) -> None:
        with self.lock:
            self.items.append((message.id, outcome, reason))
            self.lock.notify_all()

    def wait(self, n: int, timeout: float = 10.0) -> list[tuple[str, Outcome, str]]:
        deadline = time.monotonic() + timeout
        with self.lock:
            while len(self.items) < n:
                left = deadline - time.monotonic()
                assert left > 0, f"only {len(self.items)} of {n} reports: {self.items}"
                self.lock.wait(left)
            return list(self.items)


def message(i: int) -> Message:
    return Message(id=f"m-{i}", body=f"body {i}", ack_id=f"rh-{i}",
                   attributes={"SentTimestamp": "1700000000000"})


@contextmanager
def dumper(**kwargs: Any) -> Iterator[DumperServer]:
    with open(os.devnull, "w") as devnull, DumperServer("127.0.0.1", 0, out=devnull, keep=True, **kwargs) as d:
        yield d


def test_credentials_in_the_sink_url_are_sent_as_basic_auth() -> None:
    with dumper() as d:
        sink = d.url.replace("http://", "http://us%40er:p%3Ass word@")
        channel = HttpConfig(sink=sink, concurrency=1).create(SOURCE)
        channel.start()
        reports = Reports()
        try:
            channel.publish([message(1)], reports)
            assert reports.wait(1)[0][1] is Outcome.ACK
        finally:
            channel.close(5)
        sent = d.received[0].headers["authorization"]
    assert sent == "Basic " + base64.b64encode(b"us@er:p:ss word").decode()


def test_no_userinfo_no_authorization() -> None:
    assert basic_auth("http://example.com/") is None
    with dumper() as d:
        channel = HttpConfig(sink=d.url, concurrency=1).create(SOURCE)
        channel.start()
        reports = Reports()
        channel.publish([message(1)], reports)
        reports.wait(1)
        channel.close(5)
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


def test_a_failure_reason_never_shows_the_credentials() -> None:
    with dumper(respond=lambda event, headers: 503) as d:
        sink = d.url.replace("http://", "http://user:hunter2@") + "?token=t0ps3cret"
        channel = HttpConfig(sink=sink, concurrency=1).create(SOURCE)
        channel.start()
        reports = Reports()
        channel.publish([message(1)], reports)
        (_, outcome, reason), = reports.wait(1)
        channel.close(5)
    assert outcome is Outcome.RETRY and "503" in reason
    assert "hunter2" not in reason and "t0ps3cret" not in reason and "user" not in reason
    assert "hunter2" not in repr(HttpConfig(sink=sink))


def test_one_attempt_per_publish_the_worker_retries() -> None:
    with dumper(respond=lambda event, headers: 500) as d:
        channel = HttpConfig(sink=d.url, concurrency=2).create(SOURCE)
        channel.start()
        reports = Reports()
        channel.publish([message(i) for i in range(3)], reports)
        outcomes = reports.wait(3)
        channel.close(5)
        assert {o for _, o, _ in outcomes} == {Outcome.RETRY}
        assert d.counts.refused == 3  # exactly one request per message


def test_a_trickling_answer_is_cut_at_the_timeout_and_close_keeps_its_deadline() -> None:
    """A sink that answers one byte at a time must not hold a sender past --http-timeout."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    stop = threading.Event()

    def trickle() -> None:
        while not stop.is_set():
            server.settimeout(0.2)
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
        channel.start()
        reports = Reports()
        channel.publish([message(1)], reports)
        (_, outcome, reason), = reports.wait(1, timeout=15)
        assert outcome is Outcome.RETRY and "Timeout" in reason
        channel.close(5)
    finally:
        stop.set()
        thread.join(5)
        server.close()


def test_close_returns_in_time_with_every_sender_stuck_and_reports_everything() -> None:
    with silent_server() as address:
        channel = HttpConfig(sink=f"http://{address}/", concurrency=4, timeout=600).create(SOURCE)
        channel.start()
        reports = Reports()
        channel.publish([message(i) for i in range(10)], reports)
        time.sleep(0.3)  # every sender is now waiting for an answer that never comes
        started = time.monotonic()
        channel.close(1.0)
        elapsed = time.monotonic() - started
        outcomes = reports.wait(10, timeout=1)
    assert elapsed < 3, f"close(1.0) took {elapsed:.1f}s with 4 stuck senders"
    assert sorted(i for i, _, _ in outcomes) == sorted(f"m-{i}" for i in range(10))
    assert {o for _, o, _ in outcomes} == {Outcome.RETRY}


def test_stalled_names_a_sender_stuck_past_its_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    with silent_server() as address:
        channel = HttpConfig(sink=f"http://{address}/", concurrency=1, timeout=600).create(SOURCE)
        channel.start()
        channel.publish([message(1)], Reports())
        time.sleep(0.3)
        assert channel.stalled() is None
        real = time.monotonic
        monkeypatch.setattr("channels.http.time.monotonic", lambda: real() + 700)
        assert "http sender 0" in (channel.stalled() or "")
        monkeypatch.undo()
        channel.close(0.5)
