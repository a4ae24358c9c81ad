"""What a run measures: one record type per kind of case (frozen; the report reads them)."""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["CEILING", "FAST", "INFLIGHT", "KAFKA", "REMOTE", "SLOW", "START", "Latency", "RssRun", "StartRun",
           "Throughput"]

# Scenarios: every contender of one scenario reads the same queue contents into the same peer.
CEILING = "no channel"
FAST = "fast sink"
SLOW = "20 ms sink"
KAFKA = "Kafka (tansu)"
REMOTE = "SQS +20 ms"
INFLIGHT = "in-flight, 20 ms sink"
START = "start"


@dataclass(frozen=True, slots=True)
class Throughput:
    """Drain a pre-loaded queue: msg/s and process-tree CPU per message inside the window."""

    scenario: str
    contender: str                      # the row: "poller p1", "mq-bridge", "naive loop", ...
    family: str                         # "poller", "mq-bridge", "naive", "good", "ceiling"
    messages: int
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    peer_cpu_seconds: Mapping[str, float] = field(default_factory=dict)
    details: Mapping[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.seconds > 0

    @property
    def msg_per_s(self) -> float:
        return self.messages / self.seconds if self.ok else 0.0

    @property
    def cpu_us_per_msg(self) -> float:
        return self.cpu_seconds / self.messages * 1e6 if self.ok and self.messages else 0.0

    def peer_share(self, name: str) -> float | None:
        """A peer's CPU as a share of one core over the window."""
        cpu = self.peer_cpu_seconds.get(name)
        return cpu / self.seconds if cpu is not None and self.seconds > 0 else None

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "msg_per_s": round(self.msg_per_s, 1), "cpu_us_per_msg": round(self.cpu_us_per_msg, 1)}


@dataclass(frozen=True, slots=True)
class Latency:
    """A steady offered load: send stamp -> first arrival at the sink, per message."""

    contender: str
    offered_per_s: float
    sent: int
    seconds: float                      # sending time
    delivered: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    cpu_us_per_msg: float = 0.0         # process tree, from the first send to the last arrival
    windows: tuple[str, ...] = ()       # each window's own p99 and max, when pooled from several
    error: str | None = None

    @property
    def achieved_per_s(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "achieved_per_s": round(self.achieved_per_s, 1)}


@dataclass(frozen=True, slots=True)
class RssRun:
    """RSS of the process tree while the sink never answers and the queue stays full."""

    contender: str
    seconds: float
    samples: tuple[tuple[float, int], ...] = ()   # (seconds since the window began, bytes)
    received_by_sink: int = 0
    error: str | None = None
    tolerance: float = 0.10

    @property
    def start(self) -> int:
        return self.samples[0][1] if self.samples else 0

    @property
    def end(self) -> int:
        return self.samples[-1][1] if self.samples else 0

    @property
    def peak(self) -> int:
        return max((b for _t, b in self.samples), default=0)

    @property
    def flat(self) -> bool:
        """End and peak within ``tolerance`` of the start."""
        return bool(self.samples) and self.error is None and self.peak <= self.start * (1 + self.tolerance) \
            and abs(self.end - self.start) <= self.start * self.tolerance

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "start": self.start, "end": self.end, "peak": self.peak, "flat": self.flat}


@dataclass(frozen=True, slots=True)
class StartRun:
    """Start-up, several runs: exec -> the first event at the sink, and the CPU of the contender's
    whole process tree by then. Each run on a fresh queue holding one message."""

    contender: str
    family: str
    first_event_s: tuple[float, ...] = ()
    cpu_s: tuple[float, ...] = ()
    warmup: int = 1                     # runs done first and not counted (cold page cache, .pyc)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.first_event_s)

    @property
    def first_event_median(self) -> float:
        return statistics.median(self.first_event_s) if self.first_event_s else 0.0

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_s) if self.cpu_s else 0.0

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "first_event_median": round(self.first_event_median, 3),
                "cpu_median": round(self.cpu_median, 3)}
