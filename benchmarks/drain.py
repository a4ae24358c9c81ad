"""The SQS ceilings: N threads doing ReceiveMessage(10, long poll) + DeleteMessageBatch, no channel.

Two clients: boto3 (the baseline every ratio is against) and the poller's own lean
``poller.sqs.SqsClient``. Runs in the benchmark process; its CPU is measured with ``os.times()``
(user + system of the whole process, all threads) between the start barrier and the moment the
last message was deleted. Clients are built before the clock starts.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from poller.sqs import SqsClient, SqsTarget, load_credentials

from benchmarks.peers import REGION, sqs_client

__all__ = ["DrainResult", "drain_boto3", "drain_lean"]

log = logging.getLogger(__name__)

WAIT_TIME = 2  # long poll; with messages waiting a receive returns at once anyway

# One round: receive up to 10, delete them; returns (received MessageIds, deleted count).
Round = Callable[[], tuple[Sequence[str], int]]


@dataclass(frozen=True, slots=True)
class DrainResult:
    messages: int
    unique: int
    seconds: float
    cpu_seconds: float


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


class _Progress:
    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.deleted = 0
        self.ids: set[str] = set()
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.finished_at = 0.0
        self.finished_cpu = 0.0
        self.error: BaseException | None = None

    def add(self, ids: Sequence[str], deleted: int) -> None:
        with self.lock:
            self.ids.update(ids)
            self.deleted += deleted
            if self.deleted >= self.expected and not self.done.is_set():
                self.finished_at, self.finished_cpu = time.monotonic(), _cpu()
                self.done.set()


def _drain(rounds: Sequence[Round], expected: int, timeout: float) -> DrainResult:
    progress = _Progress(expected)
    start = threading.Barrier(len(rounds) + 1)

    def loop(one_round: Round) -> None:
        start.wait()
        try:
            while not progress.done.is_set():
                ids, deleted = one_round()
                progress.add(ids, deleted)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            progress.error = exc
            progress.done.set()

    threads = [threading.Thread(target=loop, args=(r,), name=f"drain-{i}", daemon=True)
               for i, r in enumerate(rounds)]
    for thread in threads:
        thread.start()
    start.wait()
    began, began_cpu = time.monotonic(), _cpu()
    if not progress.done.wait(timeout):
        raise TimeoutError(f"drained only {progress.deleted} of {expected} messages in {timeout:.0f} s")
    if progress.error is not None:
        raise RuntimeError(f"a drain thread failed: {progress.error!r}") from progress.error
    for thread in threads:
        thread.join(WAIT_TIME + 15)
    return DrainResult(messages=progress.deleted, unique=len(progress.ids),
                       seconds=progress.finished_at - began, cpu_seconds=progress.finished_cpu - began_cpu)


def drain_boto3(endpoint: str, url: str, expected: int, *, threads: int, timeout: float) -> DrainResult:
    sqs = sqs_client(endpoint, pool=threads * 2)  # boto3 clients are thread-safe; one, as users do

    def one_round() -> tuple[Sequence[str], int]:
        messages = sqs.receive_message(
            QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=WAIT_TIME,
            AttributeNames=["All"], MessageAttributeNames=["All"],
        ).get("Messages", [])
        if not messages:
            return (), 0
        answer = sqs.delete_message_batch(QueueUrl=url, Entries=[
            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)
        ])
        return [m["MessageId"] for m in messages], len(answer.get("Successful", ()))

    return _drain([one_round] * threads, expected, timeout)


def drain_lean(endpoint: str, url: str, expected: int, *, threads: int, timeout: float) -> DrainResult:
    target = SqsTarget(queue_url=url, region=REGION, endpoint_url=endpoint)
    credentials = load_credentials(target)

    def make_round() -> Round:
        client = SqsClient(target, credentials=credentials)  # one connection, one thread

        def one_round() -> tuple[Sequence[str], int]:
            messages: list[dict[str, Any]] = client.receive(max_messages=10, wait_time=WAIT_TIME)
            if not messages:
                return (), 0
            failures = client.delete_batch([m["ReceiptHandle"] for m in messages])
            return [m["MessageId"] for m in messages], len(messages) - len(failures)

        return one_round

    return _drain([make_round() for _ in range(threads)], expected, timeout)
