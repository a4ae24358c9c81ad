"""The channel interface: where the poller hands messages over.

A channel takes batches of messages with ``publish`` and reports, exactly once per message, what
became of it, by calling ``report(message, outcome, reason[, retry_after])``:

- ``Outcome.ACK``: the sink has it. Only now may the poller delete the message from SQS.
- ``Outcome.RETRY``: not delivered, but may be later (sink down, timeout, 5xx). The poller tries
  again after a backoff; ``retry_after`` (seconds, e.g. a 429's ``Retry-After``) lengthens it.
- ``Outcome.REJECT``: the sink will never take it (400, oversize, cannot be made an event). The
  poller leaves it to the queue's redrive policy / DLQ; it is never deleted unacknowledged.

The worker runs an event loop: ``publish`` is called on the loop's thread and must not block.
Reports are made on that thread too, in any order, during ``publish`` or later: a channel whose
sink answers on threads of its own brings its reports over (``loop.call_soon_threadsafe``; the
Kafka channel's ``channels.kafka.reports``); the worker restarts on a report from another thread.
A channel must report every message it was given at the latest in ``aclose``, where what is
still undelivered is reported as ``RETRY``.

A channel makes one delivery attempt per ``publish`` (bounded by its own deadline) and does not
retry: the worker owns retries, their backoff, the circuit that pauses receiving while the sink
is down, and FIFO order (one sequencer: it hands a channel a message group's next message only
after the previous one was acked, unless the channel ``keeps_order`` of what it is given at once),
so a message's whole history is in one place.

A channel is built inside the worker process (after the fork/spawn) from its picklable config:
``ChannelConfig.create()``. Nothing here knows about SQS: a ``Message`` carries an opaque
``ack_id`` that the channel passes back untouched.
"""

from __future__ import annotations

import abc
import asyncio
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

__all__ = [
    "Channel",
    "ChannelConfig",
    "ChannelError",
    "Message",
    "Outcome",
    "Report",
]


class Outcome(enum.Enum):
    ACK = "ack"
    RETRY = "retry"
    REJECT = "reject"


@dataclass(slots=True, eq=False)
class Message:
    """One message as the channel sees it; channels treat it as read-only.

    Not a frozen dataclass: a frozen one's ``__init__`` sets each field through
    ``object.__setattr__``, which doubled its cost (~1 us), once per message on the hot path.
    Compared by identity.

    ``attributes`` are the queue's system attributes (``SentTimestamp``, ``MessageGroupId``,
    ``ApproximateReceiveCount``, ...), string to string. ``message_attributes`` are the user's,
    shaped as SQS gives them: ``{"name": {"DataType": "String", "StringValue": "..."}}``.
    """

    id: str
    body: str
    ack_id: str = field(repr=False)
    attributes: Mapping[str, str] = field(default_factory=dict)
    message_attributes: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    md5_of_body: str = ""

    @property
    def group_id(self) -> str | None:
        """The FIFO message group, or None on a standard queue."""
        return self.attributes.get("MessageGroupId")


class Report(Protocol):
    """``report(message, outcome, reason, retry_after=0.0)``: reason is a short human string, empty
    for ACK; ``retry_after``: seconds the sink asked to wait before the next attempt."""

    def __call__(self, message: Message, outcome: Outcome, reason: str = "", retry_after: float = 0.0,
                 /) -> None: ...


class ChannelError(Exception):
    """The channel cannot work at all (bad config, sink or broker unusable). One line, no traceback."""


class Channel(abc.ABC):
    """A sink for messages. Use as a context manager, or call ``start`` and ``close``."""

    #: True if messages given in one ``publish`` reach the sink in that order, even across
    #: retries of the channel's own transport (Kafka's idempotent producer, one partition): the
    #: worker may then hand over a FIFO group's messages together instead of one at a time.
    keeps_order: bool = False

    def start(self) -> None:
        """Connect and check the sink; raise ``ChannelError`` if it can never work. May block."""

    @abc.abstractmethod
    def publish(self, batch: Sequence[Message], report: Report) -> None:
        """Hand over a batch; ``report`` is called once per message, now or later."""
        raise NotImplementedError("The 'publish' method must be implemented.")

    def shed(self) -> None:
        """The worker's circuit opened: report RETRY now for what has not reached the sink yet
        (queued behind the channel's own in-flight limit), so it waits for the circuit instead
        of going into the outage. What is already out runs on. By default nothing is shed (a
        producer queue cannot take messages back)."""

    def close(self, timeout: float = 30.0) -> None:
        """Deliver what is pending within ``timeout``; report the rest as RETRY. Returns within
        ``timeout`` (plus a fraction of a second), however stuck the sink is. May block."""

    async def aclose(self, timeout: float = 30.0) -> None:
        """``close`` for the worker's loop: a channel of threads closes in a thread; a channel
        that lives on the loop overrides this."""
        await asyncio.to_thread(self.close, timeout)

    def stalled(self) -> str | None:
        """Why the channel cannot make progress (a thread stuck past its own deadline), or None.

        Polled about once a second by the worker; a reason that persists makes the worker stop
        sending heartbeats, and the supervisor replaces it."""
        return None

    def __enter__(self) -> Channel:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class ChannelConfig(Protocol):
    """A channel's settings: frozen, picklable, validated on creation; builds the channel."""

    name: ClassVar[str]

    @property
    def attempt_timeout(self) -> float:
        """Seconds one delivery attempt of this channel can take at most, by its own deadline
        (the HTTP request's, the record's ``message.timeout.ms``). The worker's give-up bound
        (``--max-processing-time``) must be above it, or a slow but working channel would have
        every attempt given up before it could answer."""
        ...

    def create(self, source: str) -> Channel:
        """Build the channel for events whose CloudEvents ``source`` is ``source`` (the queue URL)."""
        ...
