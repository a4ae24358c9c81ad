"""What a channel gives the poller to be found, configured and checked: a ``ChannelPlugin``.

A distribution registers one under the entry-point group ``sqs_poller.channels`` (the built-in
HTTP and Kafka channels are registered the same way, in the poller's own ``pyproject.toml``)::

    [project.entry-points."sqs_poller.channels"]
    jsonl = "jsonl_channel:CHANNEL"

The entry point's name is the ``--channel`` value and must equal ``ChannelPlugin.name``. The
module it names is imported for every ``poller run`` and ``--help`` (its flags are flags of
``poller run``): keep it cheap, and import a heavy client library inside ``build`` or the
channel's own module, as the Kafka channel does with confluent-kafka.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from channels.base import ChannelConfig
from channels.events import EventShape
from channels.options import Option

__all__ = ["BuildContext", "ChannelPlugin", "start_and_close"]


@dataclass(frozen=True, slots=True, kw_only=True)
class BuildContext:
    """What a channel's config is built from: its own options' values and what the poller shares."""

    values: Mapping[str, Any]  # the channel's options, by ``Option.name``
    data_mode: str = "message"  # --data: the whole SQS message as JSON, or the raw body
    overrides: Mapping[str, str] = field(default_factory=dict)  # K_CE_OVERRIDES' extensions
    shape: EventShape = field(default_factory=EventShape)  # --envelope, --ce-type, --ce-source
    region: str | None = None  # the queue's region (--region, else the queue URL's)
    profile: str | None = None  # the AWS profile (--profile)
    # Names of the options whose value came from an environment variable, not the command line.
    from_environment: frozenset[str] = frozenset()


def _no_description(config: Any) -> str:
    return ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ChannelPlugin:
    """A channel as the poller finds it.

    ``build`` turns the parsed options into the channel's picklable ``ChannelConfig``; bad input
    is a ``ValueError`` whose text is the one line the user sees. ``deadline`` says in a few
    words what bounds one delivery attempt (``ChannelConfig.attempt_timeout``), for the error
    when ``--max-processing-time`` is not above it. ``describe`` is the detail of the start's
    log line (no secrets). ``probe`` is what ``poller check`` does to show the sink is there:
    ``(what, detail)`` for its report line, ``ChannelError`` if it is not; without one the
    channel is started and closed once. ``max_in_flight`` is its default for ``--max-in-flight``
    when it holds each message longer than a request takes (Kafka: ``linger.ms``, then the
    in-sync replicas), so that the same rate needs more room; None: the poller's own default.
    """

    name: str
    options: tuple[Option, ...]
    build: Callable[[BuildContext], ChannelConfig]
    deadline: str
    describe: Callable[[Any], str] = _no_description
    probe: Callable[[Any, str], tuple[str, str]] | None = None
    max_in_flight: int | None = None


def start_and_close(config: ChannelConfig, source: str, timeout: float = 5.0) -> None:
    """Start the channel once and close it; ``ChannelError`` if it cannot work. Blocks."""

    async def start_once() -> None:
        channel = config.create(source)
        try:
            channel.start()
        finally:
            await channel.aclose(timeout=timeout)

    asyncio.run(start_once())
