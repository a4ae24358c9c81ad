"""The fault proxy (tests/faultproxy.py) against tiny local servers: each fault does what it says.

No LocalStack: the upstreams are a keep-alive HTTP/1.1 server that counts requests per
``X-Amz-Target`` and a TCP echo server. Timing checks are lower bounds only (a loaded machine
can only make things slower).
"""

from __future__ import annotations

import http.client
import json
import socket
import socketserver
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from faultproxy import (
    HTTP_500,
    SQS_INTERNAL_ERROR,
    SQS_THROTTLING,
    Delay,
    Fault,
    FaultProxy,
    HttpError,
    SlowActions,
    SlowPaths,
    Trickle,
)

TIMEOUT = 5.0


# -- upstreams --------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the sink and LocalStack

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        target = self.headers.get("X-Amz-Target", "")
        server: CountingServer = self.server  # type: ignore[assignment]
        with server.lock:
            server.seen[target] += 1
        answer = json.dumps({"target": target, "size": len(body), "echo": body[:64].decode("latin-1")}).encode()
        if self.headers.get("X-Big-Answer"):
            answer = body  # echo a big body back
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base's signature
        pass


class CountingServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.seen: Counter[str] = Counter()


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


class EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def http_upstream() -> Iterator[CountingServer]:
    server = CountingServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def echo_upstream() -> Iterator[str]:
    server = EchoServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def http_proxy(http_upstream: CountingServer) -> Iterator[FaultProxy]:
    with FaultProxy(f"127.0.0.1:{http_upstream.server_address[1]}", http=True, seed=7) as proxy:
        yield proxy


@pytest.fixture
def tcp_proxy(echo_upstream: str) -> Iterator[FaultProxy]:
    with FaultProxy(echo_upstream) as proxy:
        yield proxy


# -- clients ----------------------------------------------------------------------------------


def post(conn: http.client.HTTPConnection, action: str = "ReceiveMessage", body: bytes = b"{}",
         headers: dict[str, str] | None = None) -> tuple[int, bytes, http.client.HTTPResponse]:
    conn.request("POST", "/", body=body, headers={"X-Amz-Target": f"AmazonSQS.{action}",
                                                  "Content-Type": "application/x-amz-json-1.0",
                                                  **(headers or {})})
    response = conn.getresponse()
    return response.status, response.read(), response


def connect(proxy: FaultProxy) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=TIMEOUT)


def raw(proxy: FaultProxy, timeout: float = TIMEOUT) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)


def echo(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def sqs_client(proxy: FaultProxy) -> object:
    return boto3.client("sqs", endpoint_url=proxy.url.rstrip("/"), region_name="us-east-1",
                        aws_access_key_id="test", aws_secret_access_key="test",
                        config=Config(retries={"total_max_attempts": 2, "mode": "standard"}))


# -- pass-through --------------------------------------------------------------------------------


def test_pass_through_relays_http_and_raw_bytes(http_proxy: FaultProxy, http_upstream: CountingServer,
                                                tcp_proxy: FaultProxy) -> None:
    conn = connect(http_proxy)
    for i in range(3):  # one keep-alive connection, request after request
        status, body, _ = post(conn, "DeleteMessageBatch", f"req {i}".encode())
        assert status == 200
        assert json.loads(body) == {"target": "AmazonSQS.DeleteMessageBatch", "size": 5, "echo": f"req {i}"}
    assert http_upstream.seen["AmazonSQS.DeleteMessageBatch"] == 3
    assert http_proxy.stats().requests["DeleteMessageBatch"] == 3
    assert http_proxy.stats().connections == 1
    with raw(tcp_proxy) as sock:
        assert echo(sock, b"\x00\x01kafka-ish bytes\xff" * 1000) == b"\x00\x01kafka-ish bytes\xff" * 1000


def test_large_bodies_pass_intact_in_http_mode(http_proxy: FaultProxy) -> None:
    big = bytes(range(256)) * 1024  # 256 KiB, every byte value
    status, body, _ = post(connect(http_proxy), body=big, headers={"X-Big-Answer": "1"})
    assert status == 200
    assert body == big


def test_upstream_down_resets_the_client() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # bound, never listening: connects are refused
        # pytest.raises first: the connect itself may see the reset.
        with FaultProxy(f"127.0.0.1:{dead}") as proxy, \
                pytest.raises((ConnectionResetError, BrokenPipeError)), raw(proxy) as sock:
            sock.sendall(b"hello")
            sock.recv(10)


# -- timing faults -------------------------------------------------------------------------------


def test_delay_adds_latency_then_clears(http_proxy: FaultProxy) -> None:
    conn = connect(http_proxy)
    http_proxy.set(Delay(0.4))
    started = time.monotonic()
    assert post(conn)[0] == 200
    assert time.monotonic() - started >= 0.4
    http_proxy.clear()
    assert post(conn)[0] == 200  # the same connection keeps working


def test_trickle_sends_a_few_bytes_at_a_time_and_sticks_to_its_connection(http_proxy: FaultProxy) -> None:
    conn = connect(http_proxy)
    post(conn)  # opened before the fault
    http_proxy.set(Trickle(chunk=16, pause=0.05))
    started = time.monotonic()
    status, body, _ = post(conn, body=b"x" * 40)
    took = time.monotonic() - started
    assert status == 200 and json.loads(body)["size"] == 40
    # An answer of > 150 bytes in 16-byte pieces 0.05 s apart: at least 9 pauses.
    assert took >= 9 * 0.05, took
    assert http_proxy.stats().trickled == 1

    http_proxy.clear()
    started = time.monotonic()
    assert post(conn)[0] == 200  # sticky: this connection still trickles
    assert time.monotonic() - started >= 9 * 0.05
    fresh = connect(http_proxy)
    assert post(fresh)[0] == 200
    assert http_proxy.stats().trickled == 1, "a connection opened after clear() trickled"


def test_trickle_that_is_not_sticky_ends_with_the_fault(http_proxy: FaultProxy) -> None:
    conn = connect(http_proxy)
    http_proxy.set(Trickle(chunk=8, pause=0.01, sticky=False))
    assert post(conn)[0] == 200
    http_proxy.clear()
    assert post(conn)[0] == 200
    assert http_proxy.stats().trickled == 1


# -- connection faults -----------------------------------------------------------------------------


def test_reset_resets_open_and_new_connections(tcp_proxy: FaultProxy) -> None:
    opened = raw(tcp_proxy)
    assert echo(opened, b"before") == b"before"
    tcp_proxy.set(Fault.RESET)
    with pytest.raises(ConnectionResetError):
        opened.recv(10)
    opened.close()
    # Accepted, then reset at once (pytest.raises first: the connect itself may see the reset).
    with pytest.raises(ConnectionResetError), raw(tcp_proxy) as new:
        new.recv(10)
    assert tcp_proxy.stats().resets == 2
    tcp_proxy.clear()
    with raw(tcp_proxy) as sock:
        assert echo(sock, b"after") == b"after"


def test_refuse_stops_listening_then_listens_again_on_the_same_port(tcp_proxy: FaultProxy) -> None:
    port = tcp_proxy.port
    opened = raw(tcp_proxy)
    assert echo(opened, b"x") == b"x"
    tcp_proxy.set(Fault.REFUSE)
    with pytest.raises(ConnectionRefusedError):
        raw(tcp_proxy)
    with pytest.raises(ConnectionResetError):
        opened.recv(10)  # the peer is gone
    opened.close()
    tcp_proxy.clear()
    assert tcp_proxy.port == port
    with raw(tcp_proxy) as sock:
        assert echo(sock, b"back") == b"back"


def test_stall_accepts_reads_and_never_answers(http_proxy: FaultProxy, http_upstream: CountingServer) -> None:
    opened = raw(http_proxy, timeout=0.5)
    request = b"POST / HTTP/1.1\r\nHost: x\r\nX-Amz-Target: AmazonSQS.ReceiveMessage\r\nContent-Length: 2\r\n\r\n{}"
    http_proxy.set(Fault.STALL)
    new = raw(http_proxy, timeout=0.5)  # the connect succeeds
    for sock in (opened, new):
        sock.sendall(request)
        with pytest.raises(TimeoutError):
            sock.recv(100)
    assert sum(http_upstream.seen.values()) == 0, "a stalled request reached the upstream"
    assert http_proxy.stats().stalled == 2
    http_proxy.clear()
    for sock in (opened, new):  # the silent connections are closed when the stall ends
        sock.settimeout(TIMEOUT)
        assert sock.recv(100) == b""
        sock.close()
    assert post(connect(http_proxy))[0] == 200


# -- http faults -------------------------------------------------------------------------------------


def test_sqs_throttling_and_500_are_what_botocore_expects(http_proxy: FaultProxy,
                                                           http_upstream: CountingServer) -> None:
    client = sqs_client(http_proxy)
    url = "http://127.0.0.1:4566/queue/us-east-1/000000000000/q"
    http_proxy.set(HttpError(SQS_THROTTLING))
    with pytest.raises(ClientError) as caught:
        client.receive_message(QueueUrl=url)  # type: ignore[attr-defined]
    error = caught.value.response
    assert error["Error"]["Code"] == "RequestThrottled"
    assert error["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert error["ResponseMetadata"]["HTTPHeaders"]["content-type"] == "application/x-amz-json-1.0"
    http_proxy.set(HttpError(SQS_INTERNAL_ERROR))
    with pytest.raises(ClientError) as caught:
        client.delete_message_batch(QueueUrl=url, Entries=[{"Id": "0", "ReceiptHandle": "h"}])  # type: ignore[attr-defined]
    assert caught.value.response["Error"]["Code"] == "InternalFailure"
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500
    assert sum(http_upstream.seen.values()) == 0
    # Two attempts each: botocore's standard retry mode takes both answers for transient errors.
    assert http_proxy.stats().canned == Counter({"ReceiveMessage": 2, "DeleteMessageBatch": 2})


def test_http_error_hits_a_fraction_of_chosen_actions_on_a_kept_connection(
    http_proxy: FaultProxy, http_upstream: CountingServer
) -> None:
    http_proxy.set(HttpError(HTTP_500, fraction=0.5, actions=frozenset({"ReceiveMessage"})))
    conn = connect(http_proxy)
    statuses = Counter(post(conn, "ReceiveMessage")[0] for _ in range(40))
    deletes = Counter(post(conn, "DeleteMessageBatch")[0] for _ in range(10))
    assert set(statuses) == {200, 500}
    assert 8 <= statuses[500] <= 32, statuses
    assert deletes == Counter({200: 10})
    assert http_upstream.seen["AmazonSQS.ReceiveMessage"] == statuses[200]
    assert http_proxy.stats().canned["ReceiveMessage"] == statuses[500]
    assert http_proxy.stats().connections == 1, "a canned answer must not cost the connection"


def test_slow_actions_hold_only_those_requests(http_proxy: FaultProxy) -> None:
    http_proxy.set(SlowActions(frozenset({"DeleteMessageBatch"}), 0.5))
    conn = connect(http_proxy)
    started = time.monotonic()
    assert post(conn, "DeleteMessageBatch")[0] == 200
    assert time.monotonic() - started >= 0.5
    assert post(conn, "ReceiveMessage")[0] == 200
    assert http_proxy.stats().slowed == Counter({"DeleteMessageBatch": 1})


def test_slow_paths_hold_only_that_method_and_path(http_proxy: FaultProxy) -> None:
    http_proxy.set(SlowPaths("POST", "/records/000.batch", 0.5))
    conn = connect(http_proxy)
    started = time.monotonic()
    conn.request("POST", "/bucket/records/000.batch", body=b"{}")
    assert conn.getresponse().read() and time.monotonic() - started >= 0.5
    conn.request("POST", "/bucket/records/010.batch", body=b"{}")
    assert conn.getresponse().status == 200
    assert http_proxy.stats().slowed == Counter({"/records/000.batch": 1})


def test_http_faults_need_http_mode(tcp_proxy: FaultProxy) -> None:
    with pytest.raises(ValueError):
        tcp_proxy.set(HttpError(HTTP_500))
    with pytest.raises(ValueError):
        tcp_proxy.set(SlowActions(frozenset({"DeleteMessageBatch"}), 1))
    with pytest.raises(ValueError):
        tcp_proxy.set(SlowPaths("PUT", "/records/", 1))


def test_chunked_requests_drop_the_connection(http_proxy: FaultProxy) -> None:
    with raw(http_proxy) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
        assert sock.recv(100) == b""


# -- the API --------------------------------------------------------------------------------------------


def test_fault_context_manager_clears_and_switching_from_threads_is_safe(http_proxy: FaultProxy) -> None:
    with http_proxy.fault(Fault.REFUSE):
        assert http_proxy.current is Fault.REFUSE
    assert http_proxy.current is Fault.PASS
    faults = [Fault.RESET, Fault.REFUSE, Fault.STALL, Delay(0.01), Trickle(4, 0.001), Fault.PASS]

    errors: list[BaseException] = []

    def toggle(offset: int) -> None:
        try:
            for i in range(30):
                http_proxy.set(faults[(i + offset) % len(faults)])
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=toggle, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    http_proxy.clear()
    assert post(connect(http_proxy))[0] == 200
    assert http_proxy.url == f"http://127.0.0.1:{http_proxy.port}/"
    assert http_proxy.address == f"127.0.0.1:{http_proxy.port}"
