"""The benchmark's peers in their own processes: HTTP sinks (``benchmarks.sink``) and the SQS delay
proxy (``benchmarks.proxy``), each started once per run and stopped by pid; Kafka topics (create,
read back)."""

from __future__ import annotations

import http.client
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

from benchmarks.keys import order_of
from poller.kit.process import HOST, free_port, wait_for

__all__ = ["DelayProxy", "Sink", "consume_count", "create_topic"]

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent


class _Child:
    """A helper process of ours in its own session, output to ``log_dir/<name>.log``, stopped by pid."""

    def __init__(self, name: str, argv: list[str], log_dir: Path) -> None:
        self.name = name
        self._log = open(log_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


class Sink(_Child):
    """``benchmarks.sink``: answers at once, after ``delay_ms``, or never (``stall``)."""

    def __init__(self, name: str, log_dir: Path, *, delay_ms: float = 0.0, stall: bool = False) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}/"
        argv = [sys.executable, "-m", "benchmarks.sink", "--port", str(self.port)]
        if stall:
            argv.append("--stall")
        elif delay_ms:
            argv += ["--delay-ms", str(delay_ms)]
        super().__init__(name, argv, log_dir)
        wait_for(self.stats, 15, f"sink on {self.url}", process=self.proc)  # type: ignore[arg-type]
        log.debug("%s ready on %s (pid %d)", name, self.url, self.pid)

    def _get(self, path: str) -> bytes:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=10)
        try:
            conn.request("GET", path)
            return conn.getresponse().read()
        finally:
            conn.close()

    def stats(self) -> dict[str, int]:
        return dict(orjson.loads(self._get("/stats")))

    def unique(self) -> int:
        return int(self.stats()["unique"])

    def latencies_us(self) -> list[int]:
        return list(orjson.loads(self._get("/latencies")))

    def reset(self) -> None:
        self._get("/reset")


class DelayProxy(_Child):
    """``benchmarks.proxy`` in front of ``upstream`` (host:port): ``rtt_ms`` added per round trip."""

    def __init__(self, upstream: str, rtt_ms: float, log_dir: Path) -> None:
        self.port = free_port()
        self.rtt_ms = rtt_ms
        super().__init__("sqs-proxy", [sys.executable, "-m", "benchmarks.proxy", "--port", str(self.port),
                                       "--upstream", upstream, "--rtt-ms", str(rtt_ms)], log_dir)
        wait_for(lambda: _port_open(HOST, self.port), 15, f"delay proxy on {self.port}", process=self.proc)  # type: ignore[arg-type]
        log.debug("delay proxy ready on %d -> %s (+%g ms)", self.port, upstream, rtt_ms)

    def url(self, url: str) -> str:
        """``url`` (the SQS endpoint or a queue URL) with its host:port replaced by the proxy's."""
        scheme, _, rest = url.partition("://")
        _hostport, slash, path = rest.partition("/")
        return f"{scheme}://{HOST}:{self.port}{slash}{path}"


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


# --------------------------------------------------------------------------- Kafka


def create_topic(bootstrap: str, partitions: int = 3) -> str:
    from confluent_kafka.admin import AdminClient, NewTopic

    topic = f"bench-{uuid.uuid4().hex[:10]}"
    admin = AdminClient({"bootstrap.servers": bootstrap, "logger": log})
    admin.create_topics([NewTopic(topic, partitions, 1)], request_timeout=15)[topic].result(timeout=20)
    return topic


def consume_count(bootstrap: str, topic: str, expected: int, *, timeout: float = 60.0) -> tuple[int, int]:
    """(records, distinct event ids) in every partition of ``topic``, read from offset 0.

    The id is the ``ce_id`` header (the poller's binary CloudEvents: the SQS message id), else the
    ``order`` in the record's value (mq-bridge writes the bare body and no id).
    Counted by consuming, never with watermarks (tansu's are not exact, see SERVICES.md), and from
    offset 0 itself: tansu resolves ``OFFSET_BEGINNING`` to the batch written first, not offset 0.
    """
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({
        "bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4().hex[:6]}",
        "enable.auto.commit": False, "logger": log,
    })
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        records = 0
        keys: set[bytes | int | None] = set()
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
                value: Any = record.value() or b""
                event_id = dict(record.headers() or []).get("ce_id")
                keys.add(event_id if event_id else order_of(value))
        keys.discard(None)
        return records, len(keys)
    finally:
        consumer.close()
