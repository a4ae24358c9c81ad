"""poller.metrics' HTTP server under abuse: idle floods, slowloris, oversized heads, and what it
serves (probes, Prometheus metrics). In-process: the server is one thread of this process."""

from __future__ import annotations

import os
import platform
import socket
import time
import tomllib
from collections.abc import Iterator
from contextlib import ExitStack, closing
from pathlib import Path

import pytest

from poller.metrics import HEAD_TIMEOUT, HttpServer, PollerCollector, serve
from poller.stats import SLOTS

from support import closed_by_server, connection_flood, http_get, threads_of

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def raw(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data``, read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


@pytest.fixture
def probes() -> Iterator[int]:
    """serve() with its production limits; yields the port."""
    server = serve("127.0.0.1", 0, health=lambda: (True, ""), ready=lambda: (False, "starting"))
    yield server.address[1]
    server.close()


def test_probes_answer_and_unknown_paths_are_404(probes: int) -> None:
    assert http_get(probes, "/healthz")[:2] == (200, "ok\n")
    assert http_get(probes, "/readyz")[:2] == (503, "starting\n")
    status, body, _ = http_get(probes, "/metrics")
    assert status == 404 and "/healthz" in body


@pytest.mark.slow
def test_healthz_answers_at_once_while_400_idle_and_5_slowloris_connections_are_open(probes: int) -> None:
    before = threads_of(os.getpid())
    with connection_flood(probes, "/healthz") as flood:
        for _ in range(5):
            status, _, seconds = http_get(probes, "/healthz", timeout=2.0)
            assert status == 200 and seconds < 1.0, (status, seconds)
            time.sleep(0.2)
        # + 1: the trickler
        assert threads_of(os.getpid()) <= before + 1, f"{threads_of(os.getpid())} threads, {before} before the flood"
        # Every idle and slow connection is closed: the flood's beyond the cap at once, the rest
        # after the head timeout (the slow ones too, though they keep sending).
        deadline = time.monotonic() + HEAD_TIMEOUT + 2.0
        still_open = [s for s in flood if not closed_by_server(s, max(0.01, deadline - time.monotonic()))]
        assert not still_open, f"{len(still_open)} connections still open after {HEAD_TIMEOUT + 2:g}s"
    assert http_get(probes, "/healthz")[0] == 200


def test_over_the_cap_the_oldest_idle_connection_is_closed_and_the_newest_served() -> None:
    def app(environ: dict, start_response: object) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])  # type: ignore[operator]
        return [b"ok"]

    server = HttpServer("127.0.0.1", 0, app, max_connections=4, head_timeout=30.0)
    port = server.address[1]
    try:
        with ExitStack() as stack:
            idle = [stack.enter_context(closing(socket.create_connection(("127.0.0.1", port)))) for _ in range(4)]
            time.sleep(0.2)  # accepted, in order
            answer = raw(port, b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\nok"), answer
            assert b"Connection: close" in answer
            assert closed_by_server(idle[0], 2.0), "the oldest idle connection was kept"
            assert not closed_by_server(idle[-1], 0.3), "a newer idle connection was closed"
    finally:
        server.close()


def test_an_idle_connection_is_closed_after_the_head_timeout() -> None:
    server = HttpServer("127.0.0.1", 0, lambda environ, start_response: [], head_timeout=0.5)
    try:
        with closing(socket.create_connection(server.address)) as sock:
            started = time.monotonic()
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")  # the head never ends
            assert closed_by_server(sock, 5.0)
            assert 0.4 < time.monotonic() - started < 2.0
    finally:
        server.close()


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", b"431"),
    (b"NONSENSE\r\n\r\n", b"400"),
    (b"GET /healthz HTTP/1.1\r\nno colon here\r\n\r\n", b"400"),
    (b"POST /healthz HTTP/1.1\r\nContent-Length: 0\r\n\r\n", b"405"),
])
def test_bad_requests_get_a_status_and_a_close(probes: int, request_bytes: bytes, status: bytes) -> None:
    answer = raw(probes, request_bytes)
    assert answer.split(b" ", 2)[1] == status, answer[:200]


def test_head_requests_get_no_body(probes: int) -> None:
    answer = raw(probes, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"\r\n\r\n")
    assert b"Content-Length: 3" in answer  # what a GET would get


def test_metrics_through_the_server() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    totals = [0] * SLOTS
    collector = PollerCollector(totals=lambda: totals, workers=lambda: 2, restarts=lambda: 3,
                                queue="orders", channel="http", healthy=lambda: 1)
    server = serve("127.0.0.1", 0, health=lambda: (True, ""), ready=lambda: (True, ""), collector=collector)
    try:
        status, body, _ = http_get(server.address[1], "/metrics")
    finally:
        server.close()
    assert status == 200
    families = list(text_string_to_metric_families(body))
    samples = {s.name: s.value for family in families for s in family.samples}
    assert samples["sqs_poller_workers"] == 2
    assert samples["sqs_poller_workers_healthy"] == 1
    assert samples["sqs_poller_worker_restarts_total"] == 3
    [build] = [s for family in families for s in family.samples if s.name == "sqs_poller_build_info"]
    version = tomllib.loads(PYPROJECT.read_text())["project"]["version"]  # the one place it is written
    assert build.value == 1
    assert build.labels == {"queue": "orders", "channel": "http", "version": version,
                            "python": platform.python_version()}


def test_a_port_in_use_is_an_oserror() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        with pytest.raises(OSError):
            serve("127.0.0.1", taken.getsockname()[1], health=lambda: (True, ""), ready=lambda: (True, ""))

