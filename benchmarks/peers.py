"""The benchmark's peers: SQS queues (create, pre-load, count), the HTTP sink process, Kafka topics."""

from __future__ import annotations

import http.client
import importlib.util
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import boto3
import orjson
from botocore.config import Config

from poller.services import HOST, free_port, wait_for

__all__ = [
    "REGION",
    "Sink",
    "consume_count",
    "create_queue",
    "create_topic",
    "load_test_module",
    "make_bodies",
    "preload",
    "queue_total",
    "sqs_client",
]

log = logging.getLogger(__name__)

REGION = "us-east-1"
ROOT = Path(__file__).resolve().parent.parent
# Long enough that no message comes back while a case runs: every delivery is counted once.
VISIBILITY_TIMEOUT = 300


def load_test_module(name: str) -> ModuleType:
    """A module of tests/ (``support``) by path: tests/ is not a package."""
    cached = sys.modules.get(f"_bench_{name}")
    if cached is not None:
        return cached
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "tests" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def sqs_client(endpoint: str, *, pool: int = 32) -> Any:
    return boto3.client(
        "sqs", endpoint_url=endpoint, region_name=REGION,
        aws_access_key_id="test", aws_secret_access_key="test",
        config=Config(retries={"max_attempts": 5, "mode": "standard"}, max_pool_connections=pool),
    )


def create_queue(sqs: Any, label: str) -> str:
    name = f"bench-{label}-{uuid.uuid4().hex[:8]}"
    return str(sqs.create_queue(QueueName=name, Attributes={"VisibilityTimeout": str(VISIBILITY_TIMEOUT)})["QueueUrl"])


def make_bodies(count: int, size: int) -> list[str]:
    """``count`` distinct ASCII bodies of ``size`` bytes (a JSON-ish order, like real traffic)."""
    bodies = []
    for i in range(count):
        head = f'{{"order":{i},"customer":"c-{i % 997}","note":"'
        bodies.append((head + "x" * max(0, size - len(head) - 2) + '"}')[:max(size, 1)])
    return bodies


def preload(sqs: Any, url: str, bodies: Sequence[str], *, threads: int = 8) -> float:
    """SendMessageBatch every body (8 threads); returns the seconds it took."""
    helpers = load_test_module("support")
    size = -(-len(bodies) // threads)
    chunks = [bodies[i:i + size] for i in range(0, len(bodies), size)]
    started = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        sent = sum(len(ids) for ids in pool.map(lambda c: helpers.send_messages(sqs, url, c), chunks))
    seconds = time.monotonic() - started
    log.info("pre-loaded %d messages in %.1f s (%.0f msg/s)", sent, seconds, sent / seconds)
    return seconds


def queue_total(sqs: Any, url: str) -> int:
    """Visible + in flight + delayed messages."""
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=[
        "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible",
        "ApproximateNumberOfMessagesDelayed",
    ])["Attributes"]
    return sum(int(v) for v in attrs.values())


# --------------------------------------------------------------------------- HTTP sink


class Sink:
    """``benchmarks.sink`` in its own process (own session), stopped by pid."""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}/"
        self._log = open(log_dir / "sink.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.sink", "--port", str(self.port)],
            cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for(self.stats, 15, f"sink on {self.url}", process=self.proc)  # type: ignore[arg-type]
        log.info("HTTP sink ready on %s (pid %d)", self.url, self.proc.pid)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _get(self, path: str) -> bytes:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=5)
        try:
            conn.request("GET", path)
            return conn.getresponse().read()
        finally:
            conn.close()

    def stats(self) -> dict[str, int]:
        return dict(orjson.loads(self._get("/stats")))

    def reset(self) -> None:
        self._get("/reset")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


# --------------------------------------------------------------------------- Kafka


def create_topic(bootstrap: str, partitions: int = 3) -> str:
    from confluent_kafka.admin import AdminClient, NewTopic

    topic = f"bench-{uuid.uuid4().hex[:10]}"
    admin = AdminClient({"bootstrap.servers": bootstrap, "logger": log})
    admin.create_topics([NewTopic(topic, partitions, 1)], request_timeout=15)[topic].result(timeout=20)
    return topic


def consume_count(bootstrap: str, topic: str, expected: int, *, timeout: float = 60.0) -> tuple[int, int]:
    """(records, distinct ``ce_id``s) of every partition of ``topic``, read from offset 0.

    Counted by consuming, never with watermarks (tansu's are not exact, see SERVICES.md).
    """
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer({
        "bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4().hex[:6]}",
        "enable.auto.commit": False, "logger": log,
    })
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        records, ids = 0, set()
        deadline = time.monotonic() + timeout
        idle_since = time.monotonic()
        while time.monotonic() < deadline:
            batch = consumer.consume(1000, timeout=0.5)
            if not batch:
                if records >= expected and time.monotonic() - idle_since > 1.0:
                    break
                continue
            idle_since = time.monotonic()
            for record in batch:
                if record.error():
                    continue
                records += 1
                ids.add(dict(record.headers() or ()).get("ce_id"))
        return records, len(ids)
    finally:
        consumer.close()
