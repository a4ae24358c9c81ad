"""Our hand-written SigV4 (poller.sqs.SigV4Signer) gives the very signature botocore gives."""

from __future__ import annotations

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
