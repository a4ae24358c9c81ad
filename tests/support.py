"""Everything the tests share: the poller as a child process, sending to and draining SQS,
reading a topic, free ports, bodies, CPU readings and a silent server. One module, no copies."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import ExitStack, closing, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic, OffsetSpec
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from channels.base import Message, Outcome
from poller.kit.dumper import DumperServer
from poller.kit.process import free_port

__all__ = [
    "Reports",
    "message",
    "BATCH_MAX_BYTES", "BATCH_MAX_ENTRIES", "CLK_TCK", "JWT", "SECRET_KEY", "SESSION_TOKEN", "STATIC_CREDENTIALS",
    "UNICODE", "Deliveries", "FakeSts", "FaultCase", "PollerProcess", "closed_by_server", "connection_flood",
    "http_get", "metric_samples", "metrics_by_key", "threads_of", "wait_empty",
    "SinkDeliveries", "Tally", "TopicDeliveries", "ce_id", "consume_topic", "cpu_seconds", "drain",
    "drain_count", "dumper_sink", "free_port", "has_ids", "make_body", "message_size", "new_topic", "pid_alive",
    "poller_cpu", "queue_counts", "send_messages", "send_parallel", "silent_server", "split", "tally",
    "wait_until",
    "HOT_MODULES", "HOT_MODULE_NAMES", "REPO", "stale_builds",
]

REPO = Path(__file__).resolve().parent.parent


def _hot_modules() -> tuple[str, ...]:
    """setup.py's HOT_MODULES (read, not imported: importing setup.py runs setup())."""
    import ast
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "HOT_MODULES" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise LookupError("setup.py has no HOT_MODULES")


HOT_MODULES = _hot_modules()  # paths, as setup.py names them
HOT_MODULE_NAMES = tuple(path.removesuffix(".py").replace("/", ".") for path in HOT_MODULES)  # for import


def stale_builds() -> list[str]:
    """The hot modules whose source changed after the mypyc build (``make compile``): the build,
    not the source, would be imported and tested. Their code is in the one shared library."""
    libraries = list((REPO / "poller").glob("_hotpath__mypyc.*.so"))
    if not libraries:
        return []
    built = min(library.stat().st_mtime for library in libraries)
    return [source for source in HOT_MODULES if (REPO / source).stat().st_mtime > built]


BATCH_MAX_ENTRIES = 10
BATCH_MAX_BYTES = 256 * 1024  # SendMessageBatch: total of all bodies + attributes per call


def message_size(entry: Mapping[str, Any]) -> int:
    """What SQS counts against its size limit: the body plus every attribute's name, type and value."""
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
        n = message_size(entry)
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
                  settle: float = 2.0, isolation: str = "read_committed") -> list[Any]:
    """Every record of the topic, reading each partition from offset 0 (no consumer group).

    Reads until ``until(records)`` holds, then until ``settle`` seconds pass without a new record
    (to catch records that should not be there: duplicates). Counted by consuming, never with
    watermarks (tansu's are off, see SERVICES.md).

    From offset 0 itself, not ``OFFSET_BEGINNING``: that one is resolved with ListOffsets(earliest),
    which tansu 0.6.0 answers with the base offset of the batch *written* first (the oldest
    ``last_modified`` in its object store), not the lowest one. When two producers race for a
    partition's first offsets, that can be a later batch, and a reader from there misses the
    batches before it (see :func:`earliest_offsets`).
    """
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"t-{uuid.uuid4().hex[:6]}",
                         "enable.auto.commit": False, "isolation.level": isolation,
                         "logger": logging.getLogger("consumer")})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
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


def wait_empty(sqs: Any, url: str, timeout: float = 60) -> None:
    """Until the queue holds nothing, visible or not, on two reads 0.3 s apart: LocalStack's
    ReceiveMessage takes each message off the visible queue and counts it in flight only once the
    receive has its batch, so a read in between sees (0, 0) with messages on their way to a
    poller (seen: a stop then gave back 20 that the test took for lost)."""
    def empty() -> bool:
        if queue_counts(sqs, url) != (0, 0):
            return False
        time.sleep(0.3)
        return queue_counts(sqs, url) == (0, 0)

    wait_until(empty, timeout, "the queue to be empty")


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, str, float]:
    """A GET of 127.0.0.1:``port``: (status, body, seconds); status 0 when nothing answered."""
    started = time.monotonic()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as response:
            return response.status, response.read().decode(), time.monotonic() - started
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), time.monotonic() - started
    except (urllib.error.URLError, OSError) as exc:  # not listening (yet), or no answer in time
        return 0, str(exc), time.monotonic() - started


def metric_samples(port: int, timeout: float = 5.0) -> list[Sample]:
    """What ``/metrics`` on 127.0.0.1:``port`` serves, parsed by prometheus_client; [] while
    nothing answers there (not serving yet)."""
    status, text, _ = http_get(port, "/metrics", timeout)
    if status != 200:
        return []
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def metrics_by_key(samples: Iterable[Sample], labels: Sequence[str] = ("le",)) -> dict[str, float]:
    """Sample values keyed ``name[value]...``, a ``[value]`` for each of ``labels`` the sample
    has (``sqs_poller_publish_seconds_bucket[+Inf]``); samples that differ only in other labels
    are added up (``sqs_poller_messages_rejected_total`` over its reasons)."""
    found: dict[str, float] = {}
    for sample in samples:
        key = sample.name + "".join(f"[{sample.labels[name]}]" for name in labels if name in sample.labels)
        found[key] = found.get(key, 0.0) + sample.value
    return found


def threads_of(pid: int) -> int:
    """The threads of a process, as the kernel counts them."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("Threads:")).split()[1])


class PollerProcess:
    """``python -m poller run ARGS`` in its own process group, output to ``log_path``."""

    def __init__(self, args: Sequence[str], env: Mapping[str, str], log_path: Path,
                 unset: Iterable[str] = ()) -> None:
        """``env`` is added to this process's environment, without the variables in ``unset``."""
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        dropped = frozenset(unset)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "poller", "run", *args],
            env={**{k: v for k, v in os.environ.items() if k not in dropped}, **env},
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
        """The supervisor's worker processes: its children but multiprocessing's resource tracker
        (a forked worker has the supervisor's command line, a spawned one spawn_main's)."""
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
            if cmdline and b"resource_tracker" not in cmdline:
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
        """SIGKILL to the whole process group (workers included), then reap; closes the log."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self._log.close()


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


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# -- where the messages went: sinks, topics and the fault suite's accounting ---------------


@contextmanager
def dumper_sink(**kwargs: Any) -> Iterator[DumperServer]:
    """The message dumper as a test sink: keeps every accepted event, prints nothing."""
    with open(os.devnull, "w") as devnull, DumperServer("127.0.0.1", 0, out=devnull, keep=True, **kwargs) as server:
        yield server


def ce_id(record: Any) -> str:
    """The CloudEvent id (the SQS MessageId) of a Kafka record in binary mode."""
    return dict(record.headers() or [])["ce_id"].decode()


def earliest_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """Per partition, the broker's answer to ListOffsets(earliest): where a consumer starting at
    ``OFFSET_BEGINNING`` (or ``auto.offset.reset=earliest``) begins. Asked for alone, through the
    admin client: ``get_watermark_offsets`` asks for earliest and latest together, and on tansu,
    whose latest can be below its earliest, its low end is not the earliest."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "logger": logging.getLogger("admin")})
    partitions = admin.list_topics(topic, timeout=10).topics[topic].partitions
    futures = admin.list_offsets({TopicPartition(topic, p): OffsetSpec.earliest() for p in partitions},
                                 request_timeout=10)
    return {tp.partition: future.result(timeout=15).offset for tp, future in futures.items()}


def has_ids(ids: Collection[str]) -> Callable[[list[Any]], bool]:
    """``consume_topic``'s ``until``: every id is among the records (checks only new records)."""
    wanted = set(ids)
    seen: set[str] = set()
    checked = [0]

    def check(records: list[Any]) -> bool:
        seen.update(ce_id(r) for r in records[checked[0]:])
        checked[0] = len(records)
        return wanted <= seen

    return check


class Deliveries(Protocol):
    """A channel the poller delivers to, and how to count what it really received."""

    channel: str

    def poller_args(self) -> list[str]: ...

    def ids(self, expected: Collection[str] = (), timeout: float = 60) -> Counter[str]:
        """MessageId -> copies received; waits up to ``timeout`` for ``expected`` where that costs."""
        ...


class SinkDeliveries:
    """The HTTP channel into a dumper; ``url`` is where the poller sends (a proxy in front, say)."""

    channel = "http"

    def __init__(self, server: DumperServer, url: str | None = None) -> None:
        self.server = server
        self.url = url or server.url

    def poller_args(self) -> list[str]:
        return ["--channel", "http", "--sink", self.url]

    def ids(self, expected: Collection[str] = (), timeout: float = 60) -> Counter[str]:
        wanted = set(expected)
        deadline = time.monotonic() + timeout
        while wanted - set(self._ids()) and time.monotonic() < deadline:
            time.sleep(0.2)
        return self._ids()

    def _ids(self) -> Counter[str]:
        return Counter(e["id"] for e in self.server.events)


class TopicDeliveries:
    """The Kafka channel into a topic, counted by reading every partition from offset 0."""

    channel = "kafka"

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic

    def poller_args(self) -> list[str]:
        return ["--channel", "kafka", "--kafka-bootstrap-servers", self.bootstrap, "--kafka-topic", self.topic]

    def ids(self, expected: Collection[str] = (), timeout: float = 60) -> Counter[str]:
        return Counter(ce_id(r) for r in self.records(expected, timeout))

    def records(self, expected: Collection[str] = (), timeout: float = 60) -> list[Any]:
        """Every record of the topic, once ``expected`` ids are among them (or ``timeout`` passed)."""
        until = has_ids(expected) if expected else (lambda records: False)
        return consume_topic(self.bootstrap, self.topic, until, timeout=timeout if expected else 5)


@dataclass(frozen=True, slots=True)
class Tally:
    """Where each sent message ended up, by MessageId: copies the channel received, copies in the
    DLQ, copies still on the queue (drained) after the run."""

    sent: frozenset[str]
    delivered: Counter[str]
    dead: Counter[str] = field(default_factory=Counter)
    queued: Counter[str] = field(default_factory=Counter)

    @property
    def lost(self) -> frozenset[str]:
        return self.sent - self.delivered.keys() - self.dead.keys() - self.queued.keys()

    @property
    def duplicates(self) -> int:
        """Copies beyond the first of each message, wherever they are: a message delivered and still
        on the queue will be delivered again, so it counts as a duplicate already."""
        return sum(n - 1 for n in (self.delivered + self.dead + self.queued).values())

    @property
    def strays(self) -> frozenset[str]:
        """Ids the channel received that were never sent (another test's, or garbage)."""
        return frozenset(self.delivered.keys() - self.sent)


class FaultCase:
    """One case of the fault suite: where its messages went, and the duplicates it allows.

    ``count_with(fn)`` tells how to count (``fn(wait) -> Tally``); ``finish()`` counts and asserts
    lost == 0 and duplicates <= ``max_duplicates``. A case that failed before ``finish()`` is
    counted anyway, for the report.
    """

    def __init__(self, case: str, channel: str, max_duplicates: int) -> None:
        self.case = case
        self.channel = channel
        self.max_duplicates = max_duplicates
        self.notes: list[str] = []
        self.tally: Tally | None = None
        self._count: Callable[[float], Tally] | None = None
        self._started = time.monotonic()
        self.seconds: float | None = None
        self.settled = False  # finish() counted: the flow had ended

    def count_with(self, count: Callable[[float], Tally]) -> None:
        """``count(wait)``: the tally, waiting up to ``wait`` seconds for deliveries still expected."""
        self._count = count

    def note(self, text: str) -> None:
        self.notes.append(text)

    def finish(self) -> Tally:
        assert self._count is not None, "count_with() was not called"
        self.seconds = time.monotonic() - self._started
        tally = self.tally = self._count(60.0)
        self.settled = True
        assert not tally.strays, f"{len(tally.strays)} events for messages never sent: {sorted(tally.strays)[:3]}"
        assert not tally.lost, f"{len(tally.lost)} of {len(tally.sent)} messages lost: {sorted(tally.lost)[:5]}"
        assert tally.duplicates <= self.max_duplicates, (
            f"{tally.duplicates} duplicates, the case allows {self.max_duplicates}")
        return tally

    def count_after_failure(self) -> None:
        """Count what got through, for the report, when the case failed before finish()."""
        if self.seconds is None:
            self.seconds = time.monotonic() - self._started
        if self.tally is None and self._count is not None:
            try:
                self.tally = self._count(5.0)
            except Exception as exc:  # the report row stays without counts
                logging.getLogger(__name__).warning("could not count case %s: %r", self.case, exc)


def _check_earliest(deliveries: TopicDeliveries) -> None:
    """Log when the broker's earliest offset of a partition is not 0: the count reads from offset 0
    and still has every record, but a consumer starting at OFFSET_BEGINNING would miss the
    records before it. The count read from OFFSET_BEGINNING in the two CI runs that missed 2 and
    11 acked records."""
    try:
        earliest = earliest_offsets(deliveries.bootstrap, deliveries.topic)
    except (KafkaException, FutureTimeout) as exc:  # evidence only: it must not spoil the count
        logging.getLogger(__name__).warning("could not ask for the earliest offsets of %s: %r", deliveries.topic, exc)
        return
    above_zero = {p: offset for p, offset in earliest.items() if offset > 0}
    if above_zero:
        logging.getLogger(__name__).warning(
            "the broker answers ListOffsets(earliest) above 0 for partitions %s (partition: offset) of "
            "topic %s: a reader from OFFSET_BEGINNING would miss the records before; counted from 0",
            above_zero, deliveries.topic)


def tally(sqs: Any, ids: Sequence[str], deliveries: Deliveries, *, wait: float = 60, dlq_url: str | None = None,
          dead: Iterable[str] = (), drain_url: str | None = None) -> Tally:
    """Count where ``ids`` went: ``dead`` (already taken from the DLQ) plus what ``dlq_url`` still
    holds, what ``drain_url`` (the queue) still holds, and what the channel received, waiting up to
    ``wait`` seconds for the rest. Drains (deletes) what it counts from the queues."""
    dead_ids = Counter(dead)
    if dlq_url:
        dead_ids.update(m["MessageId"] for m in drain(sqs, dlq_url, idle_receives=2, wait_seconds=1))
    queued = Counter[str]()
    if drain_url:  # idle long enough for messages of broken-off receives to come back
        queued.update(m["MessageId"] for m in drain(sqs, drain_url, idle_receives=3, wait_seconds=3))
    expected = set(ids) - dead_ids.keys() - queued.keys()
    result = Tally(frozenset(ids), deliveries.ids(expected, timeout=wait), dead_ids, queued)
    if isinstance(deliveries, TopicDeliveries):
        _check_earliest(deliveries)
    if result.lost and isinstance(deliveries, TopicDeliveries):
        # Evidence for the failure, not a second chance: the count stays read_committed (what a
        # default consumer sees). Are the missing records in the log, hidden from read_committed?
        records = consume_topic(deliveries.bootstrap, deliveries.topic, lambda records: False, timeout=5,
                                isolation="read_uncommitted")
        uncommitted = {ce_id(r) for r in records}
        offsets: dict[int, list[int]] = {}
        for record in records:
            offsets.setdefault(record.partition(), []).append(record.offset())
        logging.getLogger(__name__).warning(
            "%d lost in a read_committed read; read_uncommitted, %d of them are in the topic: %s; "
            "offsets read per partition (a gap is a record the broker removed): %s",
            len(result.lost), len(result.lost & uncommitted), sorted(result.lost & uncommitted)[:5],
            {p: (min(o), max(o), len(o)) for p, o in sorted(offsets.items())})
    return result


# -- secrets and floods: the fault suite's security cases and their unit tests ----------------

# Recognisable fakes, the shapes real ones have.
JWT = ("eyJhbGciOiJSUzI1NiIsImtpZCI6ImZha2UifQ.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6b3JkZXJzOnBvbGxlciJ9"
       ".ZmFrZS1zaWduYXR1cmUtb2YtdGhlLXNlcnZpY2UtYWNjb3VudA")
SECRET_KEY = "FakeSecretKey/0123456789+abcdefghijKLMNOP"  # 40 characters, like AWS's
SESSION_TOKEN = "IQoJb3JpZ2luX2VjFAKESESSIONTOKEN0123456789abcdefghijklmnopqrstuvwxyz+/=="
STATIC_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


class FakeSts:
    """An STS endpoint that answers AssumeRoleWithWebIdentity with ``SECRET_KEY`` and
    ``SESSION_TOKEN``; with ``environment(token_file)`` botocore's default chain takes the IRSA
    path (``AWS_ROLE_ARN`` + ``AWS_WEB_IDENTITY_TOKEN_FILE``) to it."""

    ANSWER = (
        '<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
        "<AssumeRoleWithWebIdentityResult><Credentials><AccessKeyId>test</AccessKeyId>"
        f"<SecretAccessKey>{SECRET_KEY}</SecretAccessKey><SessionToken>{SESSION_TOKEN}</SessionToken>"
        "<Expiration>2099-01-01T00:00:00Z</Expiration></Credentials>"
        "<SubjectFromWebIdentityToken>system:serviceaccount:orders:poller</SubjectFromWebIdentityToken>"
        "<AssumedRoleUser><Arn>arn:aws:sts::000000000000:assumed-role/poller/s</Arn>"
        "<AssumedRoleId>AROAFAKE:s</AssumedRoleId></AssumedRoleUser></AssumeRoleWithWebIdentityResult>"
        "<ResponseMetadata><RequestId>fake</RequestId></ResponseMetadata></AssumeRoleWithWebIdentityResponse>"
    ).encode()

    def __init__(self) -> None:
        self.calls = 0
        sts = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if b"AssumeRoleWithWebIdentity" in body and JWT.encode() in body:
                    sts.calls += 1
                self.send_response(200)
                self.send_header("Content-Type", "text/xml")
                self.send_header("Content-Length", str(len(FakeSts.ANSWER)))
                self.end_headers()
                self.wfile.write(FakeSts.ANSWER)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def environment(self, token_file: Path) -> dict[str, str]:
        token_file.write_text(JWT)
        return {"AWS_ROLE_ARN": "arn:aws:iam::000000000000:role/poller",
                "AWS_WEB_IDENTITY_TOKEN_FILE": str(token_file), "AWS_ENDPOINT_URL_STS": self.url,
                "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def closed_by_server(sock: socket.socket, wait: float) -> bool:
    """True once the server closed ``sock`` (EOF or reset) within ``wait`` seconds."""
    sock.settimeout(wait)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@contextmanager
def connection_flood(port: int, path: str, *, idle: int = 400, slow: int = 5) -> Iterator[list[socket.socket]]:
    """``idle`` connections to 127.0.0.1:``port`` that send nothing and ``slow`` ones that trickle a
    request head for ``path`` (a byte every 0.2 s, never its end); yields them all, closed after."""
    stop = threading.Event()
    with ExitStack() as stack:
        socks = [stack.enter_context(closing(socket.create_connection(("127.0.0.1", port))))
                 for _ in range(idle + slow)]
        head = f"GET {path} HTTP/1.1\r\nHost: x\r\nX-Pad: ".encode() + b"a" * 1000

        def trickle() -> None:
            for i in range(len(head)):
                if stop.wait(0.2):
                    return
                for sock in socks[idle:]:
                    try:
                        sock.send(head[i:i + 1])
                    except OSError:
                        pass

        trickler = threading.Thread(target=trickle, daemon=True)
        trickler.start()
        stack.callback(trickler.join)
        stack.callback(stop.set)
        yield socks


class Reports:
    """A channel's report callback that records each verdict (the channels' unit tests)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, Outcome, str]] = []
        self.retry_after: list[float] = []

    def __call__(self, message: Message, outcome: Outcome, reason: str, retry_after: float = 0.0) -> None:
        self.items.append((message.id, outcome, reason))
        self.retry_after.append(retry_after)

    async def wait(self, n: int, timeout: float = 10.0) -> list[tuple[str, Outcome, str]]:
        deadline = time.monotonic() + timeout
        while len(self.items) < n:
            assert time.monotonic() < deadline, f"only {len(self.items)} of {n} reports: {self.items}"
            await asyncio.sleep(0.01)
        return list(self.items)


def message(i: int) -> Message:
    return Message(id=f"m-{i}", body=f"body {i}", ack_id=f"rh-{i}",
                   attributes={"SentTimestamp": "1700000000000"})
