"""Every option of ``poller run`` (and ``poller check``), declared once: flag, environment
variable, default, range, help and the channel it belongs to.

The click options, the range checks of ``poller.config`` and the README's flag table are all made
from these declarations (``python -m poller.options`` prints the table), so they cannot drift.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import click

__all__ = ["CHANNEL_NAMES", "Option", "RUN_OPTIONS", "apply", "check", "markdown_table", "option"]

CHANNEL_NAMES = ("http", "kafka")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True, slots=True, kw_only=True)
class Option:
    flag: str
    help: str
    kind: type = str  # str, int, float or bool (a flag)
    default: Any = None
    default_text: str = ""  # for --help and the README when the default is not a plain value
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    envvars: tuple[str, ...] = ()  # read too, after POLLER_<FLAG>
    multiple: bool = False
    required: bool = False
    channel: str | None = None  # only with this --channel
    dest: str = ""  # the parameter's name, if not the flag's
    lines: bool = False  # env var: one value per line (a value may contain spaces)

    @property
    def name(self) -> str:
        return self.dest or self.flag[2:].replace("-", "_")

    @property
    def env(self) -> str:
        return "POLLER_" + self.flag[2:].upper().replace("-", "_")

    def check(self, value: Any) -> None:
        """ValueError in one line unless ``value`` is within this option's range."""
        if value is None or self.kind not in (int, float):
            return
        if value != value:  # NaN: every comparison below is False, so it would pass them all
            raise ValueError(f"{self.flag} must be a number, not {value}")
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            if self.high is None:
                raise ValueError(f"{self.flag} must be at least {_number(self.low)}, not {value}")
            raise ValueError(f"{self.flag} must be between {_number(self.low)} and {_number(self.high)}, not {value}")

    def click_type(self) -> Any:
        if self.choices:
            return click.Choice(self.choices, case_sensitive=self.flag != "--log-level")
        if self.lines:
            return _Lines()
        if self.kind is int:
            return click.IntRange(_int(self.low), _int(self.high))
        if self.kind is float:
            return _FloatRange(self.low, self.high)
        return click.STRING

    def shown_default(self) -> str:
        if self.default_text:
            return self.default_text
        if self.required:
            return "(required)"
        if self.kind is bool:
            return "off"
        if self.default is None:
            return ""
        return f"`{_number(self.default)}`" if not isinstance(self.default, str) else f"`{self.default}`"


class _Lines(click.ParamType):
    """A string whose environment variable holds one value per line: click splits a multiple
    option's variable on whitespace by default, which would cut a value (a password) in two."""

    name = "KEY=VALUE"
    envvar_list_splitter = "\n"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        return value


def _number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)


O = Option  # short, for the table below

RUN_OPTIONS: tuple[Option, ...] = (
    # -- the queue ----------------------------------------------------------------------------
    O(flag="--queue-url", required=True, help="URL of the SQS queue to poll (a queue ARN is turned into its URL)."),
    O(flag="--region", envvars=("AWS_REGION",),
      default_text="the queue URL's region, else AWS_DEFAULT_REGION or the AWS config",
      help="AWS region of the queue."),
    O(flag="--endpoint-url", default_text="AWS_ENDPOINT_URL_SQS, or AWS's",
      help="SQS endpoint, e.g. LocalStack's."),
    O(flag="--profile", default_text="AWS_PROFILE", help="AWS profile."),
    # -- processes and polling ----------------------------------------------------------------
    O(flag="--channel", dest="channel_name", choices=CHANNEL_NAMES, default="http", help="Where messages go."),
    O(flag="--processes", kind=int, low=1, high=256,
      default_text="the container's CPU quota, rounded up (else the usable CPUs)",
      help="Worker processes under the supervisor."),
    O(flag="--receivers", kind=int, low=1, high=64, default=4,
      help="Long-poll ReceiveMessage calls in flight per process."),
    O(flag="--batch-size", kind=int, low=1, high=10, default=10, help="Messages per ReceiveMessage."),
    O(flag="--wait-time", kind=int, low=0, high=20, default=20, help="Long-poll wait, seconds."),
    O(flag="--visibility-timeout", kind=int, low=0, high=43200, default_text="the queue's",
      help="Visibility timeout of received messages, seconds."),
    O(flag="--max-in-flight", kind=int, low=1, high=100_000, default=100,
      help="Messages a process holds at most (delivering, waiting, or acked and not yet deleted); "
           "receiving pauses above it."),
    O(flag="--delete-linger", kind=float, low=0, high=10, default=0.05,
      help="Seconds an acknowledged message may wait for a fuller DeleteMessageBatch."),
    # -- delivery -----------------------------------------------------------------------------
    O(flag="--retries", kind=int, low=0, high=100, default=3,
      help="In-place retries of a failed delivery (with backoff) before the message is returned to "
           "SQS; not counted while the circuit is open (an outage pauses receiving instead)."),
    O(flag="--max-processing-time", kind=float, low=1, high=43200, default=300.0,
      help="Seconds one delivery attempt may hold a message before it counts as failed; must be above "
           "the channel's own deadline (--http-timeout; twice Kafka's message.timeout.ms)."),
    O(flag="--max-rate", kind=float, low=0, high=1_000_000, default=0.0,
      help="Messages per second the whole poller hands to the channel at most, to protect a "
           "subscriber; 0: no limit."),
    O(flag="--nack-backoff", kind=float, low=0, high=3600, default=2.0,
      help="Visibility of a message returned undelivered: this, doubled per receive, seconds."),
    O(flag="--nack-backoff-max", kind=float, low=0, high=43200, default=300.0,
      help="Cap of that visibility, seconds."),
    O(flag="--data", dest="data_mode", choices=("message", "body"), default="message",
      help="Event data: the whole SQS message as JSON, or the raw body."),
    # -- running --------------------------------------------------------------------------------
    O(flag="--shutdown-timeout", kind=float, low=1, high=3600, default=25.0,
      help="On SIGTERM/SIGINT, seconds to finish in-flight work before workers are killed (below "
           "Kubernetes' default 30 s grace)."),
    O(flag="--worker-timeout", kind=float, low=5, high=3600, default=60.0,
      help="Seconds without a heartbeat after which the supervisor kills and replaces a worker."),
    O(flag="--until-empty", kind=bool,
      help="Batch mode: exit 0 once the queue is drained (receives empty for a short while and "
           "everything delivered and deleted)."),
    O(flag="--max-messages", kind=int, low=1, high=10**12,
      help="Batch mode: stop after this many messages were received (then drain as on SIGTERM)."),
    O(flag="--stats-interval", kind=float, low=0.1, default=10.0,
      help="Seconds between throughput log lines (none while idle)."),
    O(flag="--log-level", choices=LOG_LEVELS, default="INFO", help="Log level; logs go to stderr."),
    O(flag="--log-format", choices=("text", "json"), default="text",
      help="Log lines as text, or one JSON object per line for log shippers."),
    O(flag="--metrics-port", kind=int, low=1, high=65535, default_text="off",
      help="Serve Prometheus /metrics, and /healthz and /readyz, on this port."),
    O(flag="--metrics-host", default="127.0.0.1",
      help="Address for --metrics-port and --health-port (0.0.0.0 to let Prometheus or the kubelet in)."),
    O(flag="--health-port", kind=int, low=1, high=65535, default_text="off",
      help="Serve /healthz and /readyz on this port (when there is no --metrics-port)."),
    # -- the HTTP channel -----------------------------------------------------------------------
    O(flag="--sink", envvars=("K_SINK",), channel="http",
      help="HTTP channel: the sink URL (Knative's K_SINK works too); user:password@ is sent as "
           "Basic auth."),
    O(flag="--http-mode", choices=("binary", "structured", "batch"), default="binary", channel="http",
      help="HTTP channel: CloudEvents content mode; batch: up to --http-batch-size events per request."),
    O(flag="--http-batch-size", kind=int, low=1, high=1000, default=10, channel="http",
      help="HTTP channel, batch mode: events per request; a 2xx answer with batchItemFailures "
           "retries just those."),
    O(flag="--http-concurrency", kind=int, low=1, high=1024, default=64, channel="http",
      help="HTTP channel: requests in flight per process at most, each on a keep-alive connection."),
    O(flag="--http-timeout", kind=float, low=0.001, high=3600, default=30.0, channel="http",
      help="HTTP channel: seconds for a whole delivery attempt (waiting for a connection, connect, send, the full answer)."),
    # -- the Kafka channel ----------------------------------------------------------------------
    O(flag="--kafka-bootstrap-servers", channel="kafka", help="Kafka channel: host:port[,host:port...]."),
    O(flag="--kafka-topic", channel="kafka", help="Kafka channel: the topic."),
    O(flag="--kafka-config", multiple=True, lines=True, channel="kafka",
      help="Kafka channel: a librdkafka setting KEY=VALUE, repeatable (env: one per line)."),
    O(flag="--kafka-format", choices=("binary", "structured", "raw"), default="binary", channel="kafka",
      help="Kafka channel: CloudEvents binary or structured mode, or the raw body."),
    O(flag="--kafka-key", default="group", channel="kafka",
      help="Kafka channel: record key: group (FIFO MessageGroupId), attribute:NAME, or none."),
    O(flag="--kafka-timestamp", choices=("now", "sent"), default="now", channel="kafka",
      help="Kafka channel: record timestamp: the produce time, or SentTimestamp (a backlog older "
           "than the topic's retention.ms may be deleted by the broker at once)."),
    O(flag="--kafka-auth", choices=("none", "tls", "scram-sha-512", "iam"), default="none", channel="kafka",
      help="Kafka channel: authentication (iam needs the msk extra)."),
    O(flag="--kafka-region", channel="kafka", default_text="the queue's region",
      help="Kafka channel: the MSK cluster's region, for --kafka-auth iam."),
    O(flag="--kafka-create-topic", kind=bool, channel="kafka",
      help="Kafka channel: create the topic if it is missing."),
    O(flag="--kafka-partitions", kind=int, low=1, high=100_000, default=3, channel="kafka",
      help="Kafka channel: partitions of a created topic."),
    O(flag="--kafka-replication", kind=int, low=1, high=100, default=1, channel="kafka",
      help="Kafka channel: replication factor of a created topic (use 3 on MSK)."),
)

_BY_FLAG = {o.flag: o for o in RUN_OPTIONS}


def option(flag: str) -> Option:
    return _BY_FLAG[flag]


class _FloatRange(click.FloatRange):
    """click's FloatRange, which takes "nan": it compares false with both bounds."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if number != number:
            self.fail(f"{value!r} is not a number.", param, ctx)
        return number


def check(flag: str, value: Any) -> None:
    """The range check of ``flag``'s declaration (for ``poller.config``)."""
    _BY_FLAG[flag].check(value)


def apply(options: Iterable[Option]) -> Callable[[Any], Any]:
    """Decorate a click command with these options, in order."""
    declared = list(options)

    def decorate(command: Any) -> Any:
        for o in reversed(declared):
            command = _click_option(o)(command)
        return command

    return decorate


def _click_option(o: Option) -> Callable[[Any], Any]:
    kwargs: dict[str, Any] = {
        "envvar": [o.env, *o.envvars], "show_envvar": True, "help": o.help,
        "required": o.required, "multiple": o.multiple,
    }
    if o.kind is bool:
        kwargs.update(is_flag=True, default=False)
    else:
        kwargs["type"] = o.click_type()
        # Only a real default: click >= 8.3 takes an explicit None as a value, and a required
        # option with a "value" is never missing.
        if o.multiple:
            kwargs["default"] = ()
        elif o.default is not None:
            kwargs["default"] = o.default
        if o.lines:
            kwargs["metavar"] = "KEY=VALUE"
    if o.default_text and o.default_text != "off":
        kwargs["help"] = f"{o.help} [default: {o.default_text}]"
        kwargs["show_default"] = False
    else:
        kwargs["show_default"] = o.default is not None and o.kind is not bool
    return click.option(o.flag, o.name, **kwargs)


def markdown_table(options: Sequence[Option] = RUN_OPTIONS) -> str:
    """The README's flag table: flag, environment variable, default, what it does."""
    lines = ["| flag | env | default | |", "|---|---|---|---|"]
    for o in options:
        envs = ", ".join(f"`{e}`" for e in (o.env, *o.envvars))
        rng = ""
        if o.kind in (int, float) and (o.low is not None or o.high is not None):
            rng = f" ({_number(o.low)}-{_number(o.high)})" if o.high is not None else f" (>= {_number(o.low)})"
        choices = f" (`{'`, `'.join(o.choices)}`)" if o.choices and len(o.choices) <= 4 else ""
        lines.append(f"| `{o.flag}` | {envs} | {o.shown_default()} | {o.help}{rng}{choices} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(markdown_table() + "\n")
