"""Settings of the poller, parsed once by the CLI and passed down, frozen."""

from __future__ import annotations

import os
from dataclasses import dataclass

from channels.base import ChannelConfig
from poller.sqs import SqsTarget

__all__ = ["RunConfig", "WorkerConfig"]


def _check_range(name: str, value: float, low: float, high: float | None = None) -> None:
    if value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ValueError(f"{name} must be {bounds}, not {value}")


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerConfig:
    """What one worker process needs: the queue, the channel and how to poll."""

    target: SqsTarget
    channel: ChannelConfig
    receivers: int = 4
    batch_size: int = 10
    wait_time: int = 20
    visibility_timeout: int | None = None
    # The queue's own default, read at start; used to know when to extend in-flight messages.
    queue_visibility_timeout: int = 30
    max_in_flight: int = 100
    delete_linger: float = 0.05
    deleters: int = 2
    nack_backoff_base: float = 2.0
    nack_backoff_max: float = 300.0
    # In-place retries of a message while the channel otherwise works, before it is returned.
    retries: int = 3
    retry_backoff_base: float = 0.5
    retry_backoff_max: float = 10.0
    # One delivery attempt holding a message longer than this gives it back to SQS.
    max_processing_time: float = 300.0
    # Failed deliveries in a row that open the circuit (receiving pauses, one probe at a time).
    circuit_threshold: int = 5
    # Messages per second this process hands to the channel at most (0: no limit).
    max_rate: float = 0.0
    shutdown_timeout: float = 30.0
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        _check_range("--receivers", self.receivers, 1, 64)
        _check_range("--batch-size", self.batch_size, 1, 10)
        _check_range("--wait-time", self.wait_time, 0, 20)
        if self.visibility_timeout is not None:
            _check_range("--visibility-timeout", self.visibility_timeout, 0, 43200)
        _check_range("--max-in-flight", self.max_in_flight, self.batch_size, 100_000)
        _check_range("--delete-linger", self.delete_linger, 0, 10)
        _check_range("--deleters", self.deleters, 1, 64)
        _check_range("--retries", self.retries, 0, 100)
        _check_range("--max-processing-time", self.max_processing_time, 1, 43200)
        _check_range("circuit threshold", self.circuit_threshold, 1, 10_000)
        _check_range("--max-rate", self.max_rate, 0, 1_000_000)
        _check_range("--shutdown-timeout", self.shutdown_timeout, 0.5, 3600)

    @property
    def effective_visibility_timeout(self) -> int:
        return self.visibility_timeout if self.visibility_timeout is not None else self.queue_visibility_timeout


@dataclass(frozen=True, slots=True, kw_only=True)
class RunConfig:
    """What the supervisor needs: how many workers, and each worker's config."""

    worker: WorkerConfig
    processes: int = os.cpu_count() or 1
    shutdown_timeout: float = 30.0
    stats_interval: float = 10.0
    # A worker that sent no heartbeat this long is killed and replaced.
    worker_timeout: float = 60.0

    def __post_init__(self) -> None:
        _check_range("--processes", self.processes, 1, 256)
        _check_range("--shutdown-timeout", self.shutdown_timeout, 1, 3600)
        _check_range("--stats-interval", self.stats_interval, 0.1)
        _check_range("--worker-timeout", self.worker_timeout, 5, 3600)
