"""Settings of the poller, parsed once by the CLI and passed down, frozen.

The ranges are the options' own (``poller.options``): declared once, checked here too, so a
config built in code (tests, an embedding program) is held to the same bounds as the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from channels.base import ChannelConfig
from poller.sqs import SqsTarget

__all__ = ["MAX_IN_FLIGHT", "RunConfig", "WorkerConfig", "check_attempt_bound"]

# --max-in-flight's default, unless the channel declares its own (ChannelPlugin.max_in_flight).
MAX_IN_FLIGHT = 200


def check_attempt_bound(max_processing_time: float, channel: ChannelConfig,
                        deadline: str = "its own deadline") -> None:
    """ValueError unless ``--max-processing-time`` is above the channel's own deadline for one
    attempt: else every slow but working attempt is given up before the channel could answer,
    and its request may still reach the sink after the message went back to SQS. ``deadline``:
    what sets it, in the channel's words (``ChannelPlugin.deadline``)."""
    attempt = channel.attempt_timeout
    if max_processing_time <= attempt:
        raise ValueError(f"--max-processing-time {max_processing_time:g} s must be above the {channel.name} "
                         f"channel's deadline for one attempt ({attempt:g} s: {deadline})")


def check(flag: str, value: Any) -> None:
    """``poller.options.check``, imported when a config is made: a worker gets its config
    unpickled, and the options' module brings click and the installed channels' entry points."""
    from poller.options import check as check_option

    check_option(flag, value)


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerConfig:
    """What one worker process needs: the queue, the channel and how to poll."""

    target: SqsTarget
    channel: ChannelConfig
    receivers: int = 8
    # Receives beyond --receivers while a backlog waits and SQS is far (poller.window).
    max_receivers: int = 16
    batch_size: int = 10
    wait_time: int = 20
    visibility_timeout: int | None = None
    # The queue's own default, read at start; used to know when to extend in-flight messages.
    queue_visibility_timeout: int = 30
    max_in_flight: int = MAX_IN_FLIGHT
    delete_linger: float = 0.05
    nack_backoff: float = 2.0
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
    # Batch mode: report "drained" once receives come back empty and nothing is held.
    until_empty: bool = False
    # The supervisor gives each worker a little less than its own --shutdown-timeout.
    shutdown_timeout: float = 25.0
    log_level: str = "INFO"
    log_format: str = "text"

    def __post_init__(self) -> None:
        for flag, value in (
            ("--receivers", self.receivers), ("--max-receivers", self.max_receivers),
            ("--batch-size", self.batch_size),
            ("--wait-time", self.wait_time), ("--visibility-timeout", self.visibility_timeout),
            ("--max-in-flight", self.max_in_flight), ("--delete-linger", self.delete_linger),
            ("--retries", self.retries), ("--max-processing-time", self.max_processing_time),
            ("--max-rate", self.max_rate), ("--nack-backoff", self.nack_backoff),
            ("--nack-backoff-max", self.nack_backoff_max),
        ):
            check(flag, value)
        if self.max_in_flight < self.batch_size:
            raise ValueError(f"--max-in-flight must be at least --batch-size ({self.batch_size}), "
                             f"not {self.max_in_flight}")
        if not 1 <= self.circuit_threshold <= 10_000:
            raise ValueError(f"the circuit threshold must be between 1 and 10000, not {self.circuit_threshold}")
        if not 0 < self.shutdown_timeout <= 3600:
            raise ValueError(f"a worker's shutdown timeout must be above 0, not {self.shutdown_timeout}")
        check_attempt_bound(self.max_processing_time, self.channel)

    @property
    def receive_ceiling(self) -> int:
        """The most receives at once: --max-receivers, and never fewer than --receivers."""
        return max(self.receivers, self.max_receivers)

    @property
    def effective_visibility_timeout(self) -> int:
        return self.visibility_timeout if self.visibility_timeout is not None else self.queue_visibility_timeout


@dataclass(frozen=True, slots=True, kw_only=True)
class RunConfig:
    """What the supervisor needs: how many workers, each worker's config, and what it serves."""

    worker: WorkerConfig
    # Worker processes; with autoscale, the most: one runs at first (--processes auto).
    processes: int = 1
    autoscale: bool = False
    shutdown_timeout: float = 25.0
    stats_interval: float = 10.0
    # A worker that sent no heartbeat this long is killed and replaced.
    worker_timeout: float = 60.0
    # Batch mode: stop once every worker is drained, or once this many messages were received.
    until_empty: bool = False
    max_messages: int | None = None
    # Seconds after the start at which the run stops as on SIGTERM and exits 0 (None: no limit).
    max_duration: float | None = None
    metrics_port: int | None = None
    health_port: int | None = None
    metrics_host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        for flag, value in (
            ("--processes", self.processes), ("--shutdown-timeout", self.shutdown_timeout),
            ("--stats-interval", self.stats_interval), ("--worker-timeout", self.worker_timeout),
            ("--max-messages", self.max_messages), ("--max-duration", self.max_duration),
            ("--metrics-port", self.metrics_port),
            ("--health-port", self.health_port),
        ):
            check(flag, value)

    @property
    def processes_text(self) -> str:
        """How many workers run, for the log: "2" or "auto, 1 to 2"."""
        return f"auto, 1 to {self.processes}" if self.autoscale else str(self.processes)
