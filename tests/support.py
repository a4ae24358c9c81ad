"""Everything the tests share: the poller as a child process, sending to and draining SQS,
reading a topic, free ports, bodies, CPU readings and a silent server. One module, no copies."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from poller.services import free_port

__all__ = [
    "BATCH_MAX_BYTES", "BATCH_MAX_ENTRIES", "CLK_TCK", "UNICODE", "PollerProcess", "consume_topic",
    "cpu_seconds", "drain", "drain_count", "free_port", "make_body", "new_topic", "poller_cpu",
    "queue_counts", "send_messages", "send_parallel", "silent_server", "split", "wait_until",
]

BATCH_MAX_ENTRIES = 10
BATCH_MAX_BYTES = 256 * 1024  # SendMessageBatch: total of all bodies + attributes per call


def _entry_size(entry: Mapping[str, Any]) -> int:
    size = len(entry["MessageBody"].encode())
    for name, attr in (entry.get("MessageAttributes") or {}).items():
        value = attr.get("StringValue", attr.get("BinaryValue", b""))
        size += len(name.encode()) + len(attr.get("DataType", "").encode())
        size += len(value.encode() if isinstance(value, str) else value)
    return size


def _batches(entries: list[dict[str, Any]]) -> Iterable[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    size = 0
    for entry in entries:
        n = _entry_size(entry)
        if batch and (len(batch) == BATCH_MAX_ENTRIES or size + n > BATCH_MAX_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(entry)
        size += n
    if batch:
        yield batch


def send_messages(
    sqs: Any,
    url: str,
    bodies_or_entries: Iterable[str | Mapping[str, Any]],
    *,
    group_id: str = "g",
    retries: int = 8,
) -> list[str]:
    """Send with SendMessageBatch (<= 10 entries and <= 256 KiB per call); returns MessageIds in order.

    Items are bodies or SendMessageBatch entries (``Id`` optional). On a ``.fifo`` queue, entries
    without ``MessageGroupId`` get ``group_id`` and a random ``MessageDeduplicationId``. Failed
    entries are retried with backoff unless SQS blames the sender.
    """
    fifo = url.endswith(".fifo")
    entries: list[dict[str, Any]] = []
    for i, item in enumerate(bodies_or_entries):
        entry = {"MessageBody": item} if isinstance(item, str) else dict(item)
        entry["Id"] = str(i)  # our index, so results map back to input order
        if fifo:
            entry.setdefault("MessageGroupId", group_id)
            entry.setdefault("MessageDeduplicationId", uuid.uuid4().hex)
        entries.append(entry)

    ids: dict[str, str] = {}
    for batch in _batches(entries):
        pending = batch
        for attempt in range(retries + 1):
            resp = sqs.send_message_batch(QueueUrl=url, Entries=pending)
            ids.update((ok["Id"], ok["MessageId"]) for ok in resp.get("Successful", []))
            failed = resp.get("Failed", [])
            if not failed:
                break
            if any(f.get("SenderFault") for f in failed) or attempt == retries:
                raise RuntimeError(f"SendMessageBatch failed for {len(failed)} entries: {failed[:3]}")
            retry_ids = {f["Id"] for f in failed}
            pending = [e for e in pending if e["Id"] in retry_ids]
            time.sleep(min(0.05 * 2**attempt, 2.0))
    return [ids[e["Id"]] for e in entries]


def queue_counts(sqs: Any, url: str) -> tuple[int, int]:
    """(visible, not visible) from ApproximateNumberOfMessages / ...NotVisible."""
    attrs = sqs.get_queue_attributes(
        QueueUrl=url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]), int(attrs["ApproximateNumberOfMessagesNotVisible"])


def drain(sqs: Any, url: str, *, idle_receives: int = 2, wait_seconds: int = 1) -> list[dict[str, Any]]:
    """Receive and delete until ``idle_receives`` receives in a row come back empty; returns the messages."""
    out: list[dict[str, Any]] = []
    idle = 0
    while idle < idle_receives:
        msgs = sqs.receive_message(
            QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=wait_seconds,
            AttributeNames=["All"], MessageAttributeNames=["All"],
        ).get("Messages", [])
        if not msgs:
            idle += 1
            continue
        idle = 0
        out += msgs
        sqs.delete_message_batch(
            QueueUrl=url,
            Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(msgs)],
        )
    return out


def drain_count(sqs: Any, url: str, **kwargs: Any) -> int:
    """How many messages :func:`drain` received (and deleted)."""
    return len(drain(sqs, url, **kwargs))


def consume_topic(bootstrap: str, topic: str, until: Callable[[list[Any]], bool], timeout: float = 60,
                  settle: float = 2.0) -> list[Any]:
    """Every record of the topic, reading each partition from offset 0 (no consumer group).

    Reads until ``until(records)`` holds, then until ``settle`` seconds pass without a new record
    (to catch records that should not be there: duplicates). Counted by consuming, never with
    watermarks (tansu's are off, see SERVICES.md).
    """
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"t-{uuid.uuid4().hex[:6]}",
                         "enable.auto.commit": False, "logger": logging.getLogger("consumer")})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        records: list[Any] = []
        deadline = time.monotonic() + timeout
        while not until(records) and time.monotonic() < deadline:
            records += [r for r in consumer.consume(1000, timeout=0.5) if r.error() is None]
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < settle:
            more = [r for r in consumer.consume(1000, timeout=0.5) if r.error() is None]
            if more:
                records += more
                quiet_since = time.monotonic()
        return records
    finally:
        consumer.close()


@contextmanager
def silent_server() -> Iterator[str]:
    """``127.0.0.1:PORT`` of a TCP server that accepts connections and never answers a byte."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    server.settimeout(0.2)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


# -- the poller as a child process -----------------------------------------------------------


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class PollerProcess:
    """``python -m poller run ARGS`` in its own process group, output to ``log_path``."""

    def __init__(self, args: Sequence[str], env: Mapping[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "poller", "run", *args],
            env={**os.environ, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_pids(self) -> list[int]:
        """The supervisor's worker processes (multiprocessing spawn children)."""
        pids = []
        try:
            children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
        except OSError:
            return []
        for child in children:
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if b"spawn_main" in cmdline:
                pids.append(int(child))
        return pids

    def wait_for_workers(self, count: int, timeout: float = 30.0) -> list[int]:
        wait_until(lambda: len(self.worker_pids()) >= count, timeout, f"{count} worker processes")
        wait_until(lambda: self.log_text().count("worker started") >= count, timeout, "workers to boot")
        return self.worker_pids()

    def stop(self, timeout: float = 40.0) -> int:
        """SIGTERM, wait; returns the exit code. Kills the group if it does not exit in time."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"poller did not exit within {timeout}s of SIGTERM") from None
        finally:
            self._log.close()

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


# -- bodies, topics, CPU --------------------------------------------------------------------

UNICODE = "héllo wörld, 漢字, emoji 🙂, \"quotes\" & <tags>\n"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def make_body(size: int) -> str:
    """A body of at most ``size`` UTF-8 bytes (at least one character), unicode included."""
    body = (UNICODE * (size // len(UNICODE.encode()) + 1))[:size]
    while len(body.encode()) > size and len(body) > 1:  # multi-byte characters: trim to the budget
        body = body[:-1]
    return body


def new_topic(bootstrap: str, partitions: int = 3) -> str:
    """A new topic of ``partitions`` partitions on the broker; returns its name."""
    topic = f"t-{uuid.uuid4().hex[:10]}"
    admin = AdminClient({"bootstrap.servers": bootstrap, "logger": logging.getLogger("admin")})
    admin.create_topics([NewTopic(topic, partitions, 1)], request_timeout=15)[topic].result(timeout=20)
    return topic


def send_parallel(sqs: Any, url: str, chunks: Sequence[Sequence[str | Mapping[str, Any]]],
                  threads: int = 8) -> list[list[str]]:
    """``send_messages`` for each chunk, chunks in parallel; MessageIds per chunk, in order.

    On a FIFO queue, keep each message group within one chunk: order holds only within a chunk.
    """
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda chunk: send_messages(sqs, url, chunk), chunks))


def split(items: Sequence[Any], n: int) -> list[Sequence[Any]]:
    size = -(-len(items) // n)
    return [items[i:i + size] for i in range(0, len(items), size)]


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()  # fields[0] is field 3 (state)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def poller_cpu(poller: PollerProcess) -> float:
    """CPU seconds of the supervisor and its workers."""
    return cpu_seconds(poller.pid) + sum(cpu_seconds(pid) for pid in poller.worker_pids())
