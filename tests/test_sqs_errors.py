"""SQS refusing a request for its time or for an expired session token: poller.sqs corrects its
clock from the server time SQS's error message carries, or refreshes the credentials, and sends
the request once more; the deleter retries such a delete instead of dropping it.

Against ``FakeSqs``: a small SQS of our own on 127.0.0.1 (HTTP/1.1, keep-alive) that checks each
request's SigV4 signature (botocore computes it) and its time against its own clock, refuses
expired session tokens, and answers the JSON protocol with SQS's error shapes and messages.
"""

from __future__ import annotations

import asyncio
import calendar
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials, RefreshableCredentials

from poller.deleter import Deleter
from poller.sqs import PERMISSION_PROBES, BlockingSqsClient, SqsClient, SqsError, SqsTarget, server_time
from poller.stats import Counters

REGION = "us-east-1"
SECRETS = {"AKID": "secret", "AKID2": "secret2"}


def amz(epoch: float) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(epoch))


def error_body(code: str, message: str) -> bytes:
    # SQS's JSON protocol; coral's own errors (signature, token) come as com.amazon.coral.service#
    return orjson.dumps({"__type": f"com.amazon.coral.service#{code}", "message": message})


@dataclass(frozen=True, slots=True)
class Seen:
    """One request the fake SQS got, and what it answered."""

    action: str
    amz_date: str
    token: str | None
    status: int
    code: str  # "" when it was carried out


class FakeSqs:
    """SQS's front door, in small: signature (botocore's), time window, session token, then the
    action. ``skew``: seconds its clock is ahead of ours. ``time_error``: the code it refuses a
    request's time with (SQS's JSON protocol says InvalidSignatureException). ``script``: answers
    (status, code, message) given before any check, one per request, in order."""

    def __init__(self, *, skew: float = 0.0, window: int = 300, time_error: str = "InvalidSignatureException",
                 expired_tokens: frozenset[str] = frozenset(), valid_handles: frozenset[str] | None = None) -> None:
        self.skew = skew
        self.valid_handles = valid_handles  # None: every receipt handle names a message
        self.window = window
        self.time_error = time_error
        self.expired_tokens = expired_tokens
        self.script: list[tuple[int, str, str]] = []
        self.seen: list[Seen] = []
        self.handles: list[str] = []  # the receipt handles of every batch call answered 200
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status, payload = fake.answer(self, body)
                self.send_response(status)
                self.send_header("Content-Type", "application/x-amz-json-1.0")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def target(self) -> SqsTarget:
        return SqsTarget(queue_url=f"{self.endpoint}/000000000000/q", region=REGION, endpoint_url=self.endpoint)

    def answer(self, request: BaseHTTPRequestHandler, body: bytes) -> tuple[int, bytes]:
        headers = request.headers
        action = headers["X-Amz-Target"].removeprefix("AmazonSQS.")
        amz_date = headers["X-Amz-Date"]
        token = headers.get("X-Amz-Security-Token")
        status, code, message = self._judge(request, body)
        with self._lock:
            self.seen.append(Seen(action, amz_date, token, status, code))
        if status != 200:
            return status, error_body(code, message)
        params = orjson.loads(body)
        with self._lock:
            self.handles.extend(entry["ReceiptHandle"] for entry in params.get("Entries", ()))
        return 200, orjson.dumps(_carry_out(action, params, self.valid_handles))

    def _judge(self, request: BaseHTTPRequestHandler, body: bytes) -> tuple[int, str, str]:
        with self._lock:
            if self.script:
                return self.script.pop(0)
        headers = request.headers
        if headers["Authorization"] != _expected_authorization(request, body):
            return 403, "SignatureDoesNotMatch", ("The request signature we calculated does not match the "
                                                  "signature you provided.")
        token = headers.get("X-Amz-Security-Token")
        if token in self.expired_tokens:
            return 403, "ExpiredToken", "The security token included in the request is expired"
        now = time.time() + self.skew
        sent = calendar.timegm(time.strptime(headers["X-Amz-Date"], "%Y%m%dT%H%M%SZ"))
        minutes = self.window // 60
        if sent < now - self.window:
            return 403, self.time_error, (f"Signature expired: {amz(sent)} is now earlier than "
                                          f"{amz(now - self.window)} ({amz(now)} - {minutes} min.)")
        if sent > now + self.window:
            return 403, self.time_error, (f"Signature not yet current: {amz(sent)} is still later than "
                                          f"{amz(now + self.window)} ({amz(now)} + {minutes} min.)")
        return 200, "", ""


def _expected_authorization(request: BaseHTTPRequestHandler, body: bytes) -> str:
    """The Authorization header botocore's SigV4 gives for the headers the client says it signed,
    at the time it says it signed at."""
    authorization = request.headers["Authorization"]
    credential = authorization.split("Credential=")[1].split("/")[0]
    signed = authorization.split("SignedHeaders=")[1].split(",")[0].split(";")
    aws_request = AWSRequest(method="POST", url=f"http://{request.headers['Host']}{request.path}", data=body,
                             headers={name: request.headers[name] for name in signed})
    amz_date = request.headers["X-Amz-Date"]
    aws_request.context["timestamp"] = amz_date
    auth = SigV4Auth(Credentials(credential, SECRETS.get(credential, "?")), "sqs", REGION)
    signature = auth.signature(auth.string_to_sign(aws_request, auth.canonical_request(aws_request)), aws_request)
    return (f"AWS4-HMAC-SHA256 Credential={auth.scope(aws_request)}, "
            f"SignedHeaders={';'.join(signed)}, Signature={signature}")


def _carry_out(action: str, params: dict[str, Any], valid: frozenset[str] | None) -> dict[str, Any]:
    if action == "GetQueueAttributes":
        return {"Attributes": {"VisibilityTimeout": "30"}}
    if action == "ReceiveMessage":
        return {"Messages": []}
    entries = params.get("Entries", ())
    good = [e for e in entries if valid is None or e["ReceiptHandle"] in valid]
    return {"Successful": [{"Id": e["Id"]} for e in good], "Failed": [
        {"Id": e["Id"], "SenderFault": True, "Code": "ReceiptHandleIsInvalid",
         "Message": f'The input receipt handle "{e["ReceiptHandle"]}" is not a valid receipt handle.'}
        for e in entries if e not in good]}


@pytest.fixture
def fake() -> Iterator[Callable[..., FakeSqs]]:
    servers: list[FakeSqs] = []

    def make(**kwargs: Any) -> FakeSqs:
        servers.append(FakeSqs(**kwargs))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


@pytest.fixture
def blocking() -> Iterator[Callable[..., BlockingSqsClient]]:
    clients: list[BlockingSqsClient] = []

    def make(server: FakeSqs, credentials: Credentials) -> BlockingSqsClient:
        clients.append(BlockingSqsClient(server.target(), credentials=credentials, timeout=5.0))
        return clients[-1]

    yield make
    for client in clients:
        client.close()


def refreshable(tokens: list[str], *, fail: bool = False) -> tuple[RefreshableCredentials, list[str]]:
    """botocore's refreshable credentials with ``tokens[0]``, valid for an hour by their expiry
    time (botocore would not refresh them by itself); each refresh hands out the next token."""
    handed: list[str] = []

    def refresh() -> dict[str, str]:
        if fail:
            raise RuntimeError("instance metadata service timed out")
        handed.append(tokens[len(handed) + 1])
        return {"access_key": "AKID", "secret_key": "secret", "token": handed[-1],
                "expiry_time": (datetime.now(UTC) + timedelta(hours=1)).isoformat()}

    credentials = RefreshableCredentials.create_from_metadata(
        {"access_key": "AKID", "secret_key": "secret", "token": tokens[0],
         "expiry_time": (datetime.now(UTC) + timedelta(hours=1)).isoformat()},
        refresh_using=refresh, method="test",
    )
    return credentials, handed


# -- the clock ------------------------------------------------------------------------------------


@pytest.mark.parametrize("message", [
    "Signature expired: 20130524T000000Z is now earlier than 20130524T000500Z (20130524T001000Z - 5 min.)",
    "Signature expired: 20160106T204043Z is now earlier than 20160106T211334Z (20160106T212834Z - 15 min.)",
    "Signature not yet current: 20140819T173921Z is still later than 20140819T173829Z "
    "(20140819T173329Z + 5 min.)",
])
def test_the_server_time_is_read_from_sqs_time_errors(message: str) -> None:
    expected = message.split("(")[1].split(" ")[0]
    assert amz(server_time(message) or 0) == expected


@pytest.mark.parametrize("message", ["", "The request signature we calculated does not match the signature "
                                     "you provided.", "(20130524T001000Z)", "(99999999T999999Z - 5 min.)"])
def test_no_server_time_in_other_messages(message: str) -> None:
    assert server_time(message) is None


@pytest.mark.parametrize(("skew", "time_error"), [
    (3600.0, "InvalidSignatureException"),   # our clock an hour behind: "Signature expired"
    (-3600.0, "InvalidSignatureException"),  # an hour ahead: "Signature not yet current"
    (1200.0, "SignatureDoesNotMatch"),       # SQS's query protocol's name for it
    (-86400.0, "RequestTimeTooSkewed"),
])
def test_a_skewed_clock_is_corrected_from_the_error_and_the_call_sent_again(
    fake: Callable[..., FakeSqs], blocking: Callable[..., BlockingSqsClient], skew: float, time_error: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = fake(skew=skew, time_error=time_error)
    client = blocking(server, Credentials("AKID", "secret"))

    assert client.queue_attributes() == {"VisibilityTimeout": "30"}

    refused, accepted = server.seen
    assert (refused.status, refused.code) == (403, time_error)
    assert (accepted.status, accepted.action) == (200, "GetQueueAttributes")
    # The retry was signed at SQS's time (botocore agreed with its signature: status 200).
    signed = calendar.timegm(time.strptime(accepted.amz_date, "%Y%m%dT%H%M%SZ"))
    assert abs(signed - (time.time() + skew)) < 3
    assert abs(client._client.clock.offset - skew) < 2
    assert "clock" in caplog.text and ("behind" if skew > 0 else "ahead of") in caplog.text

    # Every later call is signed right the first time: receive, delete, visibility change.
    assert client.receive(max_messages=10, wait_time=0) == []
    assert client.delete_batch(["h1", "h2"]) == []
    assert client.change_visibility_batch([("h1", 30)]) == []
    assert [s.status for s in server.seen[2:]] == [200, 200, 200]


def test_a_request_signed_long_ago_is_sent_again_signed_now(
    fake: Callable[..., FakeSqs], blocking: Callable[..., BlockingSqsClient]
) -> None:
    """The clock was right but the request sat for minutes before it went out (a blocked loop):
    SQS's time says so; the clock keeps (about) no offset, the request is signed anew."""
    server = fake()
    now = time.time()
    server.script.append((403, "InvalidSignatureException",
                          f"Signature expired: {amz(now - 1200)} is now earlier than {amz(now - 300)} "
                          f"({amz(now)} - 5 min.)"))
    client = blocking(server, Credentials("AKID", "secret"))
    assert client.delete_batch(["h"]) == []
    assert [s.status for s in server.seen] == [403, 200]
    assert abs(client._client.clock.offset) < 2


@pytest.mark.parametrize(("code", "message"), [
    ("RequestTimeTooSkewed", "The difference between the request time and the current time is too large."),
    ("SignatureDoesNotMatch", "The request signature we calculated does not match the signature you provided."),
])
def test_a_refusal_without_a_server_time_is_retryable_but_not_sent_again(
    fake: Callable[..., FakeSqs], blocking: Callable[..., BlockingSqsClient], code: str, message: str
) -> None:
    server = fake()
    server.script.append((403, code, message))
    client = blocking(server, Credentials("AKID", "secret"))
    with pytest.raises(SqsError) as info:
        client.delete_batch(["h"])
    assert (info.value.code, info.value.retryable) == (code, True)
    assert len(server.seen) == 1  # nothing would have changed: no blind resend
    assert client._client.clock.offset == 0.0


def test_a_wrong_secret_key_is_refused_once_per_call(
    fake: Callable[..., FakeSqs], blocking: Callable[..., BlockingSqsClient]
) -> None:
    server = fake()
    client = blocking(server, Credentials("AKID", "not-the-secret"))
    with pytest.raises(SqsError) as info:
        client.queue_attributes()
    assert info.value.code == "SignatureDoesNotMatch"
    assert len(server.seen) == 1


# -- expired session tokens -----------------------------------------------------------------------


def test_an_expired_token_refreshes_the_credentials_and_the_call_is_sent_again(
    fake: Callable[..., FakeSqs], blocking: Callable[..., BlockingSqsClient]
) -> None:
    server = fake(expired_tokens=frozenset({"t1"}))
    credentials, handed = refreshable(["t1", "t2"])
    client = blocking(server, credentials)

    assert client.delete_batch(["h"]) == []

    assert handed == ["t2"]
    assert [(s.token, s.status, s.code) for s in server.seen] == [("t1", 403, "ExpiredToken"), ("t2", 200, "")]
    assert client.receive(max_messages=1, wait_time=0) == []  # and the new token stays
    assert server.seen[-1].token == "t2" and handed == ["t2"]


def test_expired_token_errors_of_concurrent_calls_refresh_once(fake: Callable[..., FakeSqs]) -> None:
    server = fake(expired_tokens=frozenset({"t1"}))
    credentials, handed = refreshable(["t1", "t2", "t3"])

    async def main() -> list[Any]:
        client = SqsClient(server.target(), credentials=credentials, timeout=5.0)
        try:
            return await asyncio.gather(*(client.delete_batch([f"h{i}"]) for i in range(8)))
        finally:
            client.close()

    assert asyncio.run(main()) == [[]] * 8
    assert handed == ["t2"]
    assert sum(s.code == "ExpiredToken" for s in server.seen) == 8
    assert sum(s.token == "t2" and s.status == 200 for s in server.seen) == 8


def test_an_expired_token_of_static_credentials_is_a_retryable_error(
    fake: Callable[..., FakeSqs], blocking: Callable[..., BlockingSqsClient]
) -> None:
    server = fake(expired_tokens=frozenset({"t1"}))
    client = blocking(server, Credentials("AKID", "secret", "t1"))
    with pytest.raises(SqsError) as info:
        client.delete_batch(["h"])
    assert (info.value.code, info.value.retryable) == ("ExpiredToken", True)
    assert len(server.seen) == 1  # nothing to refresh: not sent again


def test_a_failing_forced_refresh_is_a_retryable_credential_error(
    fake: Callable[..., FakeSqs], blocking: Callable[..., BlockingSqsClient]
) -> None:
    server = fake(expired_tokens=frozenset({"t1"}))
    credentials, _ = refreshable(["t1"], fail=True)
    client = blocking(server, credentials)
    with pytest.raises(SqsError) as info:
        client.delete_batch(["h"])
    assert (info.value.code, info.value.retryable) == ("CredentialError", True)
    assert "instance metadata service timed out" in str(info.value)
    # A refresh forced a moment ago is not forced again at once: the token error comes back.
    with pytest.raises(SqsError) as info:
        client.delete_batch(["h"])
    assert (info.value.code, info.value.retryable) == ("ExpiredToken", True)


def test_a_refresh_that_brings_the_same_token_is_not_sent_again(
    fake: Callable[..., FakeSqs], blocking: Callable[..., BlockingSqsClient]
) -> None:
    server = fake(expired_tokens=frozenset({"t1"}))
    credentials, handed = refreshable(["t1", "t1"])
    client = blocking(server, credentials)
    with pytest.raises(SqsError) as info:
        client.delete_batch(["h"])
    assert info.value.code == "ExpiredToken" and handed == ["t1"]
    assert len(server.seen) == 1


# -- what stays permanent -------------------------------------------------------------------------


@pytest.mark.parametrize("code", ["AccessDenied", "AccessDeniedException", "QueueDoesNotExist",
                                  "InvalidParameterValue", "InvalidClientTokenId"])
def test_permanent_errors_stay_permanent_and_are_not_sent_again(
    fake: Callable[..., FakeSqs], blocking: Callable[..., BlockingSqsClient], code: str
) -> None:
    server = fake()
    server.script.append((400 if code.startswith("Invalid") else 403, code, "no"))
    client = blocking(server, Credentials("AKID", "secret"))
    with pytest.raises(SqsError) as info:
        client.delete_batch(["h"])
    assert (info.value.code, info.value.retryable) == (code, False)
    assert len(server.seen) == 1


@pytest.mark.parametrize("code", ["ExpiredToken", "ExpiredTokenException", "RequestTimeTooSkewed",
                                  "SignatureDoesNotMatch", "InvalidSignatureException", "RequestExpired"])
def test_time_and_token_errors_are_retryable(
    fake: Callable[..., FakeSqs], blocking: Callable[..., BlockingSqsClient], code: str
) -> None:
    server = fake()
    server.script.append((403, code, "refused"))
    client = blocking(server, Credentials("AKID", "secret"))
    with pytest.raises(SqsError) as info:
        client.queue_attributes()
    assert (info.value.code, info.value.retryable) == (code, True)


# -- the deleter ----------------------------------------------------------------------------------


def _delete(server: FakeSqs, credentials: Credentials, handles: list[str]) -> tuple[Counters, list[str]]:
    """Acked handles through a Deleter with a real client; the counters and what it gave back."""
    counters = Counters()
    done: list[str] = []

    async def main() -> None:
        client = SqsClient(server.target(), credentials=credentials, timeout=5.0)
        deleter = Deleter(client, linger=0.0, visibility_timeout=10, done=done.extend, counters=counters)
        try:
            for handle in handles:
                deleter.add(handle)
            assert await deleter.close(15.0)
        finally:
            client.close()

    asyncio.run(main())
    return counters, done


def _counts(counters: Counters) -> dict[str, int]:
    return {name: counters.get(name) for name in ("deleted", "delete_failed", "expired")}


def test_the_deleter_retries_deletes_refused_for_an_expired_token(fake: Callable[..., FakeSqs]) -> None:
    """Static credentials whose token SQS refuses three times (a refresh outside the process, the
    clock catching up): the batch is retried within the deleter's deadline, not dropped."""
    server = fake()
    server.script += [(403, "ExpiredTokenException", "The security token included in the request is expired")] * 3
    counters, done = _delete(server, Credentials("AKID", "secret"), ["a", "b", "c"])
    assert _counts(counters) == {"deleted": 3, "delete_failed": 0, "expired": 0}
    assert sorted(done) == ["a", "b", "c"]
    assert [s.code for s in server.seen] == ["ExpiredTokenException"] * 3 + [""]


def test_the_deleter_deletes_on_a_skewed_clock(fake: Callable[..., FakeSqs]) -> None:
    server = fake(skew=-7200.0)
    counters, _ = _delete(server, Credentials("AKID", "secret"), [f"h{i}" for i in range(25)])
    assert _counts(counters) == {"deleted": 25, "delete_failed": 0, "expired": 0}
    refused = [s for s in server.seen if s.status != 200]
    assert refused and all(s.code == "InvalidSignatureException" for s in refused)
    assert len(refused) <= 3  # batches in flight before the first answer; none after


def test_the_deleter_still_drops_a_delete_that_is_not_allowed(fake: Callable[..., FakeSqs]) -> None:
    server = fake()
    server.script.append((403, "AccessDenied", "not authorized to perform: sqs:deletemessage"))
    counters, done = _delete(server, Credentials("AKID", "secret"), ["a"])
    assert _counts(counters) == {"deleted": 0, "delete_failed": 1, "expired": 0}
    assert done == ["a"] and len(server.seen) == 1


def test_expected_authorization_is_botocores(fake: Callable[..., FakeSqs]) -> None:
    """The fake's judge is botocore: a request botocore itself signed passes, a changed one fails."""
    server = fake()
    body = b'{"QueueUrl":"q"}'
    url = server.endpoint + "/"
    request = AWSRequest(method="POST", url=url, data=body, headers={
        "Content-Type": "application/x-amz-json-1.0", "X-Amz-Target": "AmazonSQS.GetQueueAttributes"})
    SigV4Auth(Credentials("AKID", "secret"), "sqs", REGION).add_auth(request)
    def post(data: bytes) -> int:
        req = urllib.request.Request(url, data=data, method="POST", headers=dict(request.headers.items()))
        try:
            with urllib.request.urlopen(req, timeout=5) as answer:
                return int(answer.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    assert post(body) == 200
    assert post(body.replace(b"q", b"r")) == 403
    assert [s.code for s in server.seen] == ["", "SignatureDoesNotMatch"]


# -- permission probes (a made-up receipt handle) -------------------------------------------------


@pytest.mark.parametrize("probe", PERMISSION_PROBES, ids=lambda p: p.action)
def test_a_probe_sends_one_made_up_handle_and_an_answer_about_it_means_allowed(
    fake: Callable[..., FakeSqs], blocking: Callable[..., BlockingSqsClient], probe: Any
) -> None:
    server = fake(valid_handles=frozenset())
    client = blocking(server, Credentials("AKID", "secret"))
    assert client.probe(probe) == "ReceiptHandleIsInvalid"
    assert client.probe(probe) == "ReceiptHandleIsInvalid"
    assert [(s.action, s.status) for s in server.seen] == [(probe.action, 200)] * 2


@pytest.mark.parametrize(("status", "code", "allowed"), [
    (400, "InvalidParameterValue", True),    # SQS's own refusal of the call: it got past IAM
    (400, "ReceiptHandleIsInvalid", True),
    (403, "AccessDenied", False),
    (403, "AccessDeniedException", False),
    (403, "InvalidClientTokenId", False),
    (403, "", False),                        # a 403 without SQS's error code proves nothing
    (500, "InternalFailure", False),
    (400, "RequestThrottled", False),
])
def test_which_refusals_of_a_probe_mean_allowed(
    fake: Callable[..., FakeSqs], blocking: Callable[..., BlockingSqsClient], status: int, code: str, allowed: bool
) -> None:
    server = fake(valid_handles=frozenset())
    server.script.append((status, code, "refused"))
    client = blocking(server, Credentials("AKID", "secret"))
    probe = PERMISSION_PROBES[0]
    if allowed:
        assert client.probe(probe) == code
    else:
        with pytest.raises(SqsError) as info:
            client.probe(probe)
        assert info.value.code == (code or f"HTTP{status}")


def test_probe_handles_are_new_each_time_and_never_name_a_message(fake: Callable[..., FakeSqs]) -> None:
    server = fake(valid_handles=frozenset())

    async def main() -> None:
        client = SqsClient(server.target(), credentials=Credentials("AKID", "secret"))
        try:
            for _ in range(3):
                await client.probe(PERMISSION_PROBES[0])
        finally:
            client.close()

    asyncio.run(main())
    assert len(set(server.handles)) == 3  # as the server received them
    assert all(h.startswith("sqs-poller-permission-check-") for h in server.handles)
