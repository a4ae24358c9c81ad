"""SQS for the benchmark itself (boto3): queues, a batch sender, pre-loading with a progress bar, counts."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import boto3
from botocore.config import Config

from benchmarks.progress import bar

__all__ = [
    "REGION",
    "VISIBILITY_TIMEOUT",
    "create_queue",
    "fresh_queue",
    "preload",
    "queue_total",
    "send_batch",
    "sqs_client",
]

log = logging.getLogger(__name__)

REGION = "us-east-1"
# Long enough that nothing comes back while a case runs: every delivery is counted once.
VISIBILITY_TIMEOUT = 300
BATCH_MAX_ENTRIES = 10
BATCH_MAX_BYTES = 256 * 1024 - 1024  # SendMessageBatch's limit is for the whole call; keep a margin
PRELOAD_THREADS = 8


def sqs_client(endpoint: str, *, pool: int = 32) -> Any:
    return boto3.client(
        "sqs", endpoint_url=endpoint, region_name=REGION,
        aws_access_key_id="test", aws_secret_access_key="test",
        config=Config(retries={"max_attempts": 5, "mode": "standard"}, max_pool_connections=pool),
    )


def create_queue(sqs: Any, label: str) -> str:
    name = f"bench-{label}-{uuid.uuid4().hex[:8]}"
    attributes = {"VisibilityTimeout": str(VISIBILITY_TIMEOUT)}
    return str(sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"])


@contextlib.contextmanager
def fresh_queue(sqs: Any, label: str) -> Iterator[str]:
    """A new queue for one case, deleted afterwards (best effort: a run must not fail on cleanup)."""
    url = create_queue(sqs, label)
    try:
        yield url
    finally:
        try:
            sqs.delete_queue(QueueUrl=url)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not delete %s: %s", url, exc)


def _batches(bodies: Sequence[str]) -> Iterator[Sequence[str]]:
    """Runs of at most 10 bodies and ~255 KiB."""
    start, size = 0, 0
    for i, body in enumerate(bodies):
        n = len(body.encode())
        if i > start and (i - start == BATCH_MAX_ENTRIES or size + n > BATCH_MAX_BYTES):
            yield bodies[start:i]
            start, size = i, 0
        size += n
    if start < len(bodies):
        yield bodies[start:]


def send_batch(sqs: Any, url: str, bodies: Sequence[str], *, retries: int = 8) -> int:
    """One SendMessageBatch (<= 10 bodies), failed entries retried with backoff; returns the count sent."""
    pending = [{"Id": str(i), "MessageBody": b} for i, b in enumerate(bodies)]
    for attempt in range(retries + 1):
        failed = sqs.send_message_batch(QueueUrl=url, Entries=pending).get("Failed", [])
        if not failed:
            return len(bodies)
        if any(f.get("SenderFault") for f in failed) or attempt == retries:
            raise RuntimeError(f"SendMessageBatch failed for {len(failed)} entries: {failed[:3]}")
        again = {f["Id"] for f in failed}
        pending = [e for e in pending if e["Id"] in again]
        time.sleep(min(0.05 * 2**attempt, 2.0))
    return len(bodies)


def preload(sqs: Any, url: str, bodies: Sequence[str], *, label: str) -> float:
    """Send every body (8 threads, batches of 10) under a progress bar; returns the seconds it took."""
    batches = list(_batches(bodies))
    lock = threading.Lock()
    started = time.monotonic()
    with bar(total=len(bodies), desc=f"preload {label}", unit="msg") as progress, \
            ThreadPoolExecutor(PRELOAD_THREADS) as pool:
        def send(batch: Sequence[str]) -> int:
            sent = send_batch(sqs, url, batch)
            with lock:
                progress.update(sent)
            return sent

        total = sum(pool.map(send, batches))
    seconds = time.monotonic() - started
    log.debug("pre-loaded %d messages in %.1f s (%.0f msg/s)", total, seconds, total / max(seconds, 1e-9))
    if total != len(bodies):
        raise RuntimeError(f"pre-loaded {total} of {len(bodies)} messages")
    return seconds


def queue_total(sqs: Any, url: str) -> int:
    """Visible + in flight + delayed messages."""
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=[
        "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible",
        "ApproximateNumberOfMessagesDelayed",
    ])["Attributes"]
    return sum(int(v) for v in attrs.values())
