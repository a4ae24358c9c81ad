"""Our hand-written SigV4 (poller.sqs.SigV4Signer) gives the very signature botocore gives."""

from __future__ import annotations

import calendar
import time

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from poller.sqs import SigV4Signer, SqsClient, SqsTarget


def botocore_headers(credentials: Credentials, region: str, url: str, action: str, body: bytes) -> dict[str, str]:
    request = AWSRequest(
        method="POST", url=url, data=body,
        headers={"Content-Type": "application/x-amz-json-1.0", "X-Amz-Target": "AmazonSQS." + action},
    )
    SigV4Auth(credentials, "sqs", region).add_auth(request)
    return dict(request.headers.items())


@pytest.mark.parametrize("token", [None, "FwoGZXIvYXdzEJr//////////wEaDOPxSessionToken=="])
@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("https://sqs.eu-west-1.amazonaws.com/", "sqs.eu-west-1.amazonaws.com"),
        ("http://127.0.0.1:4566/", "127.0.0.1:4566"),
        ("https://sqs.eu-west-1.amazonaws.com:443/", "sqs.eu-west-1.amazonaws.com"),
    ],
)
@pytest.mark.parametrize("action", ["ReceiveMessage", "DeleteMessageBatch"])
def test_signature_matches_botocore(token: str | None, url: str, host: str, action: str) -> None:
    credentials = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token)
    body = b'{"QueueUrl":"https://sqs.eu-west-1.amazonaws.com/123456789012/q","MaxNumberOfMessages":10}'
    expected = botocore_headers(credentials, "eu-west-1", url, action, body)
    # Sign at the second botocore signed at.
    now = time.strptime(expected["X-Amz-Date"], "%Y%m%dT%H%M%SZ")
    ours = SigV4Signer(credentials, region="eu-west-1", host=host).headers(action, body, now)
    assert ours["Authorization"] == expected["Authorization"]
    assert ours["X-Amz-Date"] == expected["X-Amz-Date"]
    assert ours.get("X-Amz-Security-Token") == expected.get("X-Amz-Security-Token")


def test_client_signs_for_the_host_header_it_sends() -> None:
    target = SqsTarget(queue_url="http://127.0.0.1:4566/000000000000/q", region="us-east-1",
                       endpoint_url="http://127.0.0.1:4566")
    client = SqsClient(target, credentials=Credentials("a", "b"))
    headers = client._signer.headers("GetQueueAttributes", b"{}")
    assert headers["Host"] == "127.0.0.1:4566"
    assert "SignedHeaders=content-type;host;x-amz-date;x-amz-target" in headers["Authorization"]


def test_signing_key_is_cached_per_day_and_secret() -> None:
    signer = SigV4Signer(Credentials("a", "secret1"), region="us-east-1", host="h")
    day1 = time.strptime("20261125T000000Z", "%Y%m%dT%H%M%SZ")
    day2 = time.strptime("20261126T000000Z", "%Y%m%dT%H%M%SZ")
    first = signer.headers("ReceiveMessage", b"{}", day1)["Authorization"]
    assert signer.headers("ReceiveMessage", b"{}", day1)["Authorization"] == first
    assert signer.headers("ReceiveMessage", b"{}", day2)["Authorization"] != first


def test_the_signature_moves_with_the_clock_it_is_given() -> None:
    """A skew-corrected clock: X-Amz-Date moves by its offset, and the signature is botocore's at
    that time."""
    credentials = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
    body = b'{"QueueUrl":"https://sqs.eu-west-1.amazonaws.com/123456789012/q"}'
    local = 1_800_000_000.0  # 2027-01-15T08:00:00Z
    offset = 3 * 3600 + 17.0
    skewed = SigV4Signer(credentials, region="eu-west-1", host="sqs.eu-west-1.amazonaws.com",
                         clock=lambda: local + offset).headers("DeleteMessageBatch", body)
    plain = SigV4Signer(credentials, region="eu-west-1", host="sqs.eu-west-1.amazonaws.com",
                        clock=lambda: local).headers("DeleteMessageBatch", body)
    assert plain["X-Amz-Date"] == "20270115T080000Z"
    assert skewed["X-Amz-Date"] == "20270115T110017Z"
    at = time.strptime(skewed["X-Amz-Date"], "%Y%m%dT%H%M%SZ")
    request = AWSRequest(method="POST", url="https://sqs.eu-west-1.amazonaws.com/", data=body, headers={
        "Content-Type": "application/x-amz-json-1.0", "X-Amz-Target": "AmazonSQS.DeleteMessageBatch"})
    request.context["timestamp"] = skewed["X-Amz-Date"]
    auth = SigV4Auth(credentials, "sqs", "eu-west-1")
    auth._modify_request_before_signing(request)
    signature = auth.signature(auth.string_to_sign(request, auth.canonical_request(request)), request)
    assert skewed["Authorization"].endswith(f"Signature={signature}")
    assert skewed["Authorization"] == SigV4Signer(
        credentials, region="eu-west-1", host="sqs.eu-west-1.amazonaws.com").headers("DeleteMessageBatch", body, at)[
        "Authorization"]


def test_the_client_signs_with_its_corrected_clock() -> None:
    target = SqsTarget(queue_url="http://127.0.0.1:4566/000000000000/q", region="us-east-1",
                       endpoint_url="http://127.0.0.1:4566")
    client = SqsClient(target, credentials=Credentials("a", "b"))
    before = time.time()
    client.clock.offset = -7200.0
    signed = time.strptime(client._signer.headers("GetQueueAttributes", b"{}")["X-Amz-Date"], "%Y%m%dT%H%M%SZ")
    assert before - 7200 - 2 <= calendar.timegm(signed) <= time.time() - 7200 + 1
