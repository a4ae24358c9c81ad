"""poller/sqs.py's lean client against a real SQS (LocalStack): calls, per-entry failures, errors."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.credentials import Credentials

from poller.sqs import (
    BatchFailure,
    BlockingSqsClient,
    SqsError,
    SqsTarget,
    queue_url_from_arn,
    region_from_queue_url,
    region_mismatch,
    resolve_target,
)

from conftest import REGION, MakeQueue
from support import free_port, queue_counts, send_messages

pytestmark = pytest.mark.integration


@pytest.fixture
def client_for(sqs_endpoint: str) -> Iterator[Any]:
    clients: list[BlockingSqsClient] = []

    def make(queue_url: str, **kwargs: Any) -> BlockingSqsClient:
        client = BlockingSqsClient(SqsTarget(queue_url=queue_url, region=REGION, endpoint_url=sqs_endpoint), **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()




def test_round_trip(sqs: Any, make_queue: MakeQueue, client_for: Any) -> None:
    queue = make_queue(visibility_timeout=30)
    ids = send_messages(sqs, queue.url, [
        {"MessageBody": f"body {i} \u00e9\u6f22", "MessageAttributes": {
            "kind": {"DataType": "String", "StringValue": f"k{i}"}}}
        for i in range(5)
    ])
    client = client_for(queue.url)

    attributes = client.queue_attributes()
    assert attributes["VisibilityTimeout"] == "30"
    assert attributes["QueueArn"] == queue.arn
    assert int(attributes["ApproximateNumberOfMessages"]) == 5

    received: list[dict[str, Any]] = []
    for _ in range(10):
        received += client.receive(max_messages=10, wait_time=1, visibility_timeout=60)
        if len(received) >= 5:
            break
    assert sorted(m.id for m in received) == sorted(ids)
    by_id = {m.id: m for m in received}
    first = by_id[ids[0]]
    assert first.body == "body 0 \u00e9\u6f22"
    assert first.message_attributes["kind"]["StringValue"] == "k0"
    assert first.attributes["ApproximateReceiveCount"] == "1"
    assert "SentTimestamp" in first.attributes
    assert first.ack_id and first.md5_of_body
    assert queue_counts(sqs, queue.url) == (0, 5)

    # Make two visible again at once, delete the other three.
    back, gone = received[:2], received[2:]
    assert client.change_visibility_batch([(m.ack_id, 0) for m in back]) == []
    assert client.delete_batch([m.ack_id for m in gone]) == []
    again: list[dict[str, Any]] = []
    for _ in range(10):
        again += client.receive(max_messages=10, wait_time=1)
        if len(again) >= 2:
            break
    assert sorted(m.id for m in again) == sorted(m.id for m in back)
    assert all(m.attributes["ApproximateReceiveCount"] == "2" for m in again)
    assert client.delete_batch([m.ack_id for m in again]) == []
    assert queue_counts(sqs, queue.url) == (0, 0)


def test_receive_empty_queue_returns_empty_list(make_queue: MakeQueue, client_for: Any) -> None:
    client = client_for(make_queue().url)
    started = time.monotonic()
    assert client.receive(max_messages=10, wait_time=1) == []
    assert time.monotonic() - started >= 0.5  # it did long-poll


def _receive_all(client: BlockingSqsClient, n: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for _ in range(20):
        out += client.receive(max_messages=10, wait_time=1, visibility_timeout=60)
        if len(out) >= n:
            return out
    raise AssertionError(f"received {len(out)} of {n}")


def test_delete_batch_with_one_bogus_handle(sqs: Any, make_queue: MakeQueue, client_for: Any) -> None:
    queue = make_queue()
    send_messages(sqs, queue.url, ["a", "b", "c"])
    client = client_for(queue.url)
    messages = _receive_all(client, 3)
    handles = [m.ack_id for m in messages]
    handles.insert(1, "bogus-receipt-handle")

    failures = client.delete_batch(handles)

    assert len(failures) == 1, failures
    failure = failures[0]
    assert isinstance(failure, BatchFailure)
    assert failure.index == 1
    assert failure.code == "ReceiptHandleIsInvalid"
    assert "bogus-receipt-handle" in failure.message
    # SenderFault as the service says it (AWS: true; LocalStack says false), parsed faithfully:
    boto = sqs.delete_message_batch(QueueUrl=queue.url, Entries=[
        {"Id": "0", "ReceiptHandle": "bogus-receipt-handle"}])["Failed"][0]
    assert failure.sender_fault is boto["SenderFault"]
    assert queue_counts(sqs, queue.url) == (0, 0)  # the three real ones are gone


def test_change_visibility_batch_with_one_bogus_handle(sqs: Any, make_queue: MakeQueue, client_for: Any) -> None:
    queue = make_queue()
    send_messages(sqs, queue.url, ["a", "b"])
    client = client_for(queue.url)
    messages = _receive_all(client, 2)
    entries = [(m.ack_id, 0) for m in messages] + [("bogus-receipt-handle", 0)]

    failures = client.change_visibility_batch(entries)

    assert [f.index for f in failures] == [2], failures
    assert queue_counts(sqs, queue.url) == (2, 0)  # both real ones visible again


def test_queue_does_not_exist(make_queue: MakeQueue, client_for: Any) -> None:
    existing = make_queue().url
    missing = existing.rsplit("/", 1)[0] + f"/missing-{uuid.uuid4().hex[:8]}"
    client = client_for(missing)
    for call in (client.queue_attributes,
                 lambda: client.receive(max_messages=1, wait_time=0),
                 lambda: client.delete_batch(["x"])):
        with pytest.raises(SqsError) as info:
            call()
        assert info.value.code == "QueueDoesNotExist"
        assert info.value.retryable is False


def test_connection_refused() -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    client = BlockingSqsClient(SqsTarget(queue_url=f"{endpoint}/000000000000/q", region=REGION, endpoint_url=endpoint))
    try:
        for _ in range(2):  # and again: a failed connect leaves the client usable
            with pytest.raises(SqsError) as info:
                client.queue_attributes()
            assert info.value.code == "ConnectionError"
            assert info.value.retryable is True
    finally:
        client.close()


def test_a_failing_credential_refresh_is_a_retryable_error_then_recovers(
    make_queue: MakeQueue, sqs_endpoint: str
) -> None:
    """botocore's own refreshable credentials, whose refresh fails for a while (an STS or
    instance-metadata hiccup): each call fails with CredentialError, the next good one works."""
    from datetime import UTC, datetime, timedelta

    from botocore.credentials import RefreshableCredentials

    failing = [True]

    def refresh() -> dict[str, str]:
        if failing[0]:
            raise RuntimeError("instance metadata service timed out")
        # Always inside botocore's mandatory refresh window: every use refreshes.
        expiry = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
        return {"access_key": "test", "secret_key": "test", "token": "", "expiry_time": expiry}

    expired = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    credentials = RefreshableCredentials.create_from_metadata(
        {"access_key": "test", "secret_key": "test", "token": "", "expiry_time": expired},
        refresh_using=refresh, method="test",
    )
    queue = make_queue()
    client = BlockingSqsClient(SqsTarget(queue_url=queue.url, region=REGION, endpoint_url=sqs_endpoint),
                       credentials=credentials)
    try:
        for _ in range(2):
            with pytest.raises(SqsError) as info:
                client.queue_attributes()
            assert info.value.code == "CredentialError" and info.value.retryable
            assert "instance metadata service timed out" in str(info.value)
        failing[0] = False
        assert "VisibilityTimeout" in client.queue_attributes()
    finally:
        client.close()


def test_unresolvable_host() -> None:
    endpoint = "http://no-such-host.invalid:4566"
    client = BlockingSqsClient(SqsTarget(queue_url=f"{endpoint}/000000000000/q", region=REGION, endpoint_url=endpoint))
    with pytest.raises(SqsError) as info:
        client.queue_attributes()
    assert info.value.code == "ConnectionError"
    client.close()


def test_silent_endpoint_times_out() -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)  # the kernel completes the handshake; nobody ever answers
    try:
        endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
        client = BlockingSqsClient(SqsTarget(queue_url=f"{endpoint}/000000000000/q", region=REGION,
                                     endpoint_url=endpoint), timeout=0.5)
        started = time.monotonic()
        with pytest.raises(SqsError) as info:
            client.queue_attributes()
        assert info.value.code == "Timeout"
        assert info.value.retryable is True
        assert time.monotonic() - started < 3
        client.close()
    finally:
        server.close()


def test_abort_ends_a_long_poll(make_queue: MakeQueue, client_for: Any) -> None:
    client = client_for(make_queue().url)
    outcome: dict[str, Any] = {}

    def poll() -> None:
        started = time.monotonic()
        try:
            outcome["result"] = client.receive(max_messages=10, wait_time=20)
        except SqsError as exc:
            outcome["error"] = exc
        outcome["elapsed"] = time.monotonic() - started

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    time.sleep(1.0)  # the long poll is under way
    assert thread.is_alive()
    aborted = time.monotonic()
    client.abort()
    thread.join(5)
    assert not thread.is_alive(), "abort() did not end the long poll"
    assert time.monotonic() - aborted < 1.5
    assert "error" in outcome, outcome
    assert outcome["error"].code in ("ConnectionError", "Aborted")
    # and the client stays shut
    with pytest.raises(SqsError) as info:
        client.queue_attributes()
    assert info.value.code == "Aborted"


def test_resolve_target_region_from_queue_url(sqs_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    target = resolve_target("https://sqs.eu-west-2.amazonaws.com/123456789012/orders", region=None,
                            endpoint_url=None)
    assert target.region == "eu-west-2"
    assert target.endpoint_url.startswith("https://sqs.eu-west-2.")
    target = resolve_target("https://sqs.eu-west-2.amazonaws.com/123456789012/orders", region="us-east-1",
                            endpoint_url=sqs_endpoint)
    assert (target.region, target.endpoint_url) == ("us-east-1", sqs_endpoint)
    assert region_mismatch(target) == "eu-west-2"  # explicit: it wins, and the CLI warns


def test_the_queue_urls_region_wins_over_a_default_region(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    target = resolve_target("https://sqs.ap-south-1.amazonaws.com/123456789012/q", region=None, endpoint_url=None)
    assert target.region == "ap-south-1" and region_mismatch(target) is None


@pytest.mark.parametrize(("url", "region"), [
    ("https://sqs.eu-west-1.amazonaws.com/123456789012/q", "eu-west-1"),
    ("https://eu-west-1.queue.amazonaws.com/123456789012/q", "eu-west-1"),  # the legacy form
    ("http://127.0.0.1:4566/queue/us-west-2/000000000000/q", "us-west-2"),  # LocalStack
    ("http://127.0.0.1:4566/000000000000/q", None),
])
def test_region_from_queue_url(url: str, region: str | None) -> None:
    assert region_from_queue_url(url) == region


@pytest.mark.parametrize(("arn", "url"), [
    ("arn:aws:sqs:us-east-1:123456789012:orders", "https://sqs.us-east-1.amazonaws.com/123456789012/orders"),
    ("arn:aws:sqs:eu-west-1:123456789012:jobs.fifo", "https://sqs.eu-west-1.amazonaws.com/123456789012/jobs.fifo"),
    ("arn:aws-cn:sqs:cn-north-1:123456789012:q", "https://sqs.cn-north-1.amazonaws.com.cn/123456789012/q"),
    ("arn:aws:sns:us-east-1:123456789012:topic", None),
    ("https://sqs.us-east-1.amazonaws.com/123456789012/q", None),
])
def test_queue_url_from_arn(arn: str, url: str | None) -> None:
    assert queue_url_from_arn(arn) == url


class OneShotServer:
    """Answers every request on 127.0.0.1 with the next of ``answers`` and closes the connection
    after each (without ``Connection: close``: a kept-alive connection the server dropped)."""

    def __init__(self, *answers: bytes) -> None:
        self.answers = list(answers)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.requests: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        for answer in self.answers:
            conn, _ = self.listener.accept()
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                while len(body) < length:
                    body += conn.recv(65536)
                self.requests.append(head + b"\r\n\r\n" + body)
                conn.sendall(answer)

    def client(self, **kwargs: Any) -> BlockingSqsClient:
        return BlockingSqsClient(SqsTarget(queue_url=f"{self.endpoint}/000000000000/q", region=REGION,
                                   endpoint_url=self.endpoint), **kwargs)

    def close(self) -> None:
        self.thread.join(5)
        self.listener.close()


def test_answers_errors_and_stale_connections_on_the_wire() -> None:
    error = b'{"__type":"com.amazonaws.sqs#RequestThrottled","message":"slow down"}'
    server = OneShotServer(
        b'HTTP/1.1 200 OK\r\nContent-Length: 28\r\n\r\n{"Attributes":{"A":"1"}}    ',
        # the server dropped the idle connection: resent once on a fresh one, transparently
        b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(error), error),
        b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nnot json!",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
    )
    client = server.client(credentials=Credentials("AKID", "secret"))
    try:
        assert client.queue_attributes() == {"A": "1"}
        with pytest.raises(SqsError) as info:
            client.receive(max_messages=1, wait_time=0)
        assert (info.value.code, info.value.retryable) == ("RequestThrottled", True)
        assert "slow down" in str(info.value)
        for _ in range(2):
            with pytest.raises(SqsError) as info:
                client.delete_batch(["h"])
            assert (info.value.code, info.value.retryable) == ("InvalidResponse", True)
        assert client.delete_batch(["h"]) == []
    finally:
        client.close()
        server.close()
    assert len(server.requests) == 5
    head = server.requests[0].split(b"\r\n\r\n")[0].decode()
    assert head.startswith("POST / HTTP/1.1\r\n")
    assert head.count(f"Host: {server.endpoint[7:]}\r\n") == 1  # the signed one, once
    assert "X-Amz-Target: AmazonSQS.GetQueueAttributes\r\n" in head


def test_a_header_that_cannot_be_sent_is_an_sqs_error() -> None:
    server = OneShotServer()  # accepts nothing: nothing may be sent
    client = server.client(credentials=Credentials("AKID", "secret", token="tok\r\nX-Evil: 1"))
    try:
        with pytest.raises(SqsError) as info:
            client.queue_attributes()
        assert (info.value.code, info.value.retryable) == ("InvalidRequest", False)
        assert server.requests == []  # nothing was sent
    finally:
        client.close()
        server.close()
