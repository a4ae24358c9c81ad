"""Fixtures that start real services (LocalStack SQS/S3, tansu) once and stop them by pid.

Once per run: under pytest-xdist the workers share one LocalStack and one tansu
(:mod:`shared_service`). Every test makes its own queues and topics (unique names), so tests on
other workers cannot see its messages.

Environment knobs: ``SQS_ENDPOINT_URL`` runs against an existing SQS endpoint instead of starting
LocalStack; ``KAFKA_BOOTSTRAP_SERVERS`` does the same for ``kafka_broker``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from shared_service import shared_service, xdist_run_dir

from poller.kit.localkafka import create_bucket, start_tansu, tansu_s3_env
from poller.kit.localsqs import start_sqs
from poller.kit.process import Service

# drain, drain_count, queue_counts and send_messages are re-exported: tests take them from either module.
from support import drain, drain_count, queue_counts, send_messages, stale_builds  # noqa: F401

REGION = "us-east-1"
TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_REGION": REGION,
    "AWS_DEFAULT_REGION": REGION,
}


# A test that takes one of these (directly or through another fixture) talks to a real service.
SERVICE_FIXTURES = frozenset({"sqs_service", "kafka_broker", "tansu_factory"})


def pytest_configure(config: pytest.Config) -> None:
    """Refuse to test an old build of the hot path (setup.py compiles it in place; ``make test``
    builds it again first, a bare ``pytest`` does not)."""
    stale = [] if "pure_python" in sys.modules else stale_builds()  # -p pure_python: the sources
    if stale:
        raise pytest.UsageError(f"the compiled {', '.join(stale)} predate their sources: run `make compile`")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that needs a service ``integration``, whether or not its module says so:
    ``-m "not integration"`` (``make test-fast``) must not start LocalStack or tansu."""
    for item in items:
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


# What the session runs at its very end: the stop of the services this worker started for all.
_AT_SESSION_END: pytest.StashKey[list[Callable[[], None]]] = pytest.StashKey()


def _at_session_end(config: pytest.Config) -> Callable[[Callable[[], None]], None]:
    return config.stash.setdefault(_AT_SESSION_END, []).append


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """Stop the shared services here, not at unconfigure: an xdist worker reports itself finished
    after this hook, and the controller gives a finished worker only 10 s to exit before it kills
    it (LocalStack alone may take that long to stop)."""
    for stop in reversed(session.config.stash.get(_AT_SESSION_END, [])):
        stop()


@pytest.fixture(autouse=True)
def _no_logging_setup_left_behind() -> Iterator[None]:
    """A test that runs the CLI in this process (``poller.cli.main``) installs the poller's root
    handler on that test's captured stderr. Left behind, it writes to a closed file in every
    later test of the same xdist worker, and its redacting filter formats each record in place,
    so caplog sees messages without their arguments (seen: a Kafka DEBUG-log test failing only
    after one such test ran on its worker). Removed after each test, with the levels it set."""
    from poller.logs import THIRD_PARTY_LOGGERS, RedactingFilter

    root = logging.getLogger()
    before, level = set(root.handlers), root.level
    names = (*THIRD_PARTY_LOGGERS, "poller", "channels")
    levels = {name: logging.getLogger(name).level for name in names}
    yield
    for handler in root.handlers[:]:
        if handler not in before and any(isinstance(f, RedactingFilter) for f in handler.filters):
            root.removeHandler(handler)
    root.setLevel(level)
    for name, value in levels.items():
        logging.getLogger(name).setLevel(value)


@pytest.fixture(scope="session", autouse=True)
def _aws_test_credentials() -> Iterator[None]:
    """boto3 in this process needs credentials and a region; only fake test values, restored after."""
    saved = {k: os.environ.get(k) for k in (*TEST_CREDENTIALS, "AWS_SESSION_TOKEN", "AWS_PROFILE")}
    os.environ.pop("AWS_SESSION_TOKEN", None)
    os.environ.pop("AWS_PROFILE", None)
    os.environ.update(TEST_CREDENTIALS)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def sqs_service(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Iterator[Service]:
    """LocalStack with SQS and S3 (S3 backs tansu's durable storage), started once per run."""
    def start() -> Service:
        return start_sqs(
            endpoint=os.environ.get("SQS_ENDPOINT_URL") or None,
            services="sqs,s3",
            log_dir=tmp_path_factory.mktemp("localstack"),
        )

    run_dir = xdist_run_dir(tmp_path_factory.getbasetemp())
    with shared_service("localstack", run_dir, start, at_exit=_at_session_end(pytestconfig)) as service:
        yield service


@pytest.fixture(scope="session")
def sqs_endpoint(sqs_service: Service) -> str:
    return sqs_service.endpoint


@pytest.fixture(scope="session")
def aws_env(sqs_endpoint: str) -> dict[str, str]:
    """Environment for subprocesses (the poller CLI, the aws CLI) pointing at the test SQS."""
    return {**TEST_CREDENTIALS, "AWS_ENDPOINT_URL_SQS": sqs_endpoint}


def _client(service: str, endpoint: str) -> Any:
    return boto3.client(
        service,
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id="test",
        aws_secret_access_key="test",
        config=Config(retries={"max_attempts": 5, "mode": "standard"}, max_pool_connections=32),
    )


@pytest.fixture(scope="session")
def sqs(sqs_endpoint: str) -> Any:
    return _client("sqs", sqs_endpoint)


@dataclass(frozen=True, slots=True)
class Queue:
    name: str
    url: str
    arn: str
    fifo: bool
    dlq_url: str | None = None
    dlq_arn: str | None = None


MakeQueue = Callable[..., Queue]


@pytest.fixture
def make_queue(sqs: Any, request: pytest.FixtureRequest) -> Iterator[MakeQueue]:
    """Factory for uniquely named queues (and DLQs), all deleted at teardown."""
    created: list[str] = []
    stem = re.sub(r"[^A-Za-z0-9_-]", "-", request.node.name)[:40]

    def create(name: str, attributes: Mapping[str, str]) -> tuple[str, str]:
        url = sqs.create_queue(QueueName=name, Attributes=dict(attributes))["QueueUrl"]
        created.append(url)
        arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        return url, arn

    def make(
        fifo: bool = False,
        visibility_timeout: int = 30,
        dlq_max_receive_count: int | None = None,
        attributes: Mapping[str, str] | None = None,
    ) -> Queue:
        suffix = ".fifo" if fifo else ""
        name = f"{stem}-{uuid.uuid4().hex[:8]}"
        base = {"FifoQueue": "true"} if fifo else {}
        dlq_url = dlq_arn = None
        attrs = {**base, "VisibilityTimeout": str(visibility_timeout), **(attributes or {})}
        if dlq_max_receive_count is not None:
            dlq_url, dlq_arn = create(f"{name}-dlq{suffix}", base)
            attrs["RedrivePolicy"] = json.dumps(
                {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(dlq_max_receive_count)}
            )
        url, arn = create(f"{name}{suffix}", attrs)
        return Queue(name=f"{name}{suffix}", url=url, arn=arn, fifo=fifo, dlq_url=dlq_url, dlq_arn=dlq_arn)

    yield make
    for url in reversed(created):
        try:
            sqs.delete_queue(QueueUrl=url)
        except sqs.exceptions.QueueDoesNotExist:
            pass


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Iterator[str]:
    """Bootstrap servers of a session-wide tansu broker with memory storage."""
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield external
        return
    run_dir = xdist_run_dir(tmp_path_factory.getbasetemp())
    with shared_service("tansu", run_dir, lambda: start_tansu(log_dir=tmp_path_factory.mktemp("tansu")),
                        at_exit=_at_session_end(pytestconfig)) as broker:
        yield broker.endpoint


class TansuFactory:
    """Starts brokers of a test's own (memory or S3 storage, restartable on the same port).

    ``tansu_factory()`` → memory broker; ``storage, env = tansu_factory.s3_storage()`` then
    ``b = tansu_factory(storage=storage, env=env)``; ``b.stop()``; ``tansu_factory(port=<b's port>,
    storage=storage, env=env)`` comes back with the records. All are stopped at teardown.
    """

    def __init__(self, log_dir: Path, request: pytest.FixtureRequest) -> None:
        self._log_dir = log_dir
        self._request = request
        self.started: list[Service] = []

    def __call__(
        self, *, port: int | None = None, storage: str = "memory://tansu/", env: Mapping[str, str] | None = None,
        advertised: str | None = None,
    ) -> Service:
        broker = start_tansu(port=port, storage=storage, env=env, log_dir=self._log_dir, advertised=advertised)
        self.started.append(broker)
        return broker

    def s3_storage(self, bucket: str | None = None) -> tuple[str, dict[str, str]]:
        """A fresh bucket on the session LocalStack's S3: (storage URL, env for tansu)."""
        endpoint: str = self._request.getfixturevalue("sqs_endpoint")
        bucket = bucket or f"tansu-{uuid.uuid4().hex[:12]}"
        create_bucket(endpoint, bucket)
        return f"s3://{bucket}/", tansu_s3_env(endpoint)

    def stop_all(self) -> None:
        for broker in reversed(self.started):
            broker.stop()


@pytest.fixture
def tansu_factory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[TansuFactory]:
    factory = TansuFactory(tmp_path / "tansu", request)
    yield factory
    factory.stop_all()
