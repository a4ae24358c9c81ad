"""The start: how workers are started (fork while it is safe, ``poller.supervisor``), what a
worker imports, and how SQS's endpoint is resolved without a botocore client."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import botocore.session
import pytest

from poller import supervisor as supervisor_module
from poller.sqs import resolve_target

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

# -- SQS's endpoint: the same as a boto3 client's -----------------------------------------------

_ENDPOINT_CASES = [
    ("eu-west-2", None, {}),
    ("cn-north-1", None, {}),
    ("us-gov-west-1", None, {}),
    ("us-east-1", None, {"AWS_USE_FIPS_ENDPOINT": "true"}),
    ("us-east-1", None, {"AWS_USE_DUALSTACK_ENDPOINT": "true"}),
    ("eu-west-1", None, {"AWS_ENDPOINT_URL_SQS": "http://127.0.0.1:4566"}),
    ("eu-west-1", None, {"AWS_ENDPOINT_URL": "http://localhost:4567"}),
    ("eu-west-1", None, {"AWS_ENDPOINT_URL_SQS": "http://127.0.0.1:4566",
                         "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": "true"}),
    ("eu-west-1", "http://[::1]:4566", {"AWS_ENDPOINT_URL_SQS": "http://127.0.0.1:4566"}),
]


@pytest.fixture
def aws_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """No AWS setting of this machine's: an empty config file and no AWS_* variables."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    config = tmp_path / "config"
    config.write_text("")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    yield config


@pytest.mark.parametrize(("region", "given", "env"), _ENDPOINT_CASES)
def test_the_endpoint_is_a_clients(aws_config: Path, monkeypatch: pytest.MonkeyPatch, region: str,
                                   given: str | None, env: dict[str, str]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    client = botocore.session.Session().create_client("sqs", region_name=region, endpoint_url=given)
    target = resolve_target("https://sqs.eu-west-1.amazonaws.com/123456789012/q", region=region, endpoint_url=given)
    assert target.endpoint_url == client.meta.endpoint_url


def test_the_profiles_endpoint_is_a_clients(aws_config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    aws_config.write_text("[profile local]\nregion = eu-west-1\nservices = here\n\n"
                          "[services here]\nsqs =\n  endpoint_url = http://127.0.0.1:9324\n")
    client = botocore.session.Session(profile="local").create_client("sqs")
    target = resolve_target("http://127.0.0.1:9324/000000000000/q", region=None, endpoint_url=None, profile="local")
    assert target.endpoint_url == client.meta.endpoint_url == "http://127.0.0.1:9324"


@pytest.mark.parametrize(("region", "given"), [("not a region!", None), ("eu-west-1", "not a url")])
def test_a_bad_region_or_endpoint_is_a_value_error(aws_config: Path, region: str, given: str | None) -> None:
    with pytest.raises(ValueError, match="cannot configure SQS"):
        resolve_target("https://sqs.eu-west-1.amazonaws.com/123456789012/q", region=region, endpoint_url=given)
