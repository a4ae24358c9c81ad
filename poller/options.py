"""Every option of ``poller run`` (and ``poller check``), declared once: flag, environment
variable, default, range and help. The poller's own are here; each channel declares its own with
the channel (``channels.plugin.ChannelPlugin.options``), and the installed channels' options are
flags of ``run`` too (``run_options``).

The click options, the range checks of ``poller.config`` and the README's flag table are all made
from these declarations (``python -m poller.options`` prints the table, with the poller's own
channels), so they cannot drift.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any

import click

from channels.envelopes import ENVELOPES
from channels.options import Option, number_text
from channels.registry import Registry, load_channels
from poller.config import MAX_IN_FLIGHT
from poller.logs import LOG_FORMATS, LOG_LEVELS

if TYPE_CHECKING:
    import cloup

__all__ = ["POLLER_OPTIONS", "Option", "apply", "check", "group_of", "installed_channels", "markdown_table",
           "option", "run_options"]


class _Lines(click.ParamType[str]):
    """A string whose environment variable holds one value per line: click splits a multiple
    option's variable on whitespace by default, which would cut a value (a password) in two."""

    name = "KEY=VALUE"
    envvar_list_splitter = "\n"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        return str(value)


class _IntOrWord(click.ParamType[Any]):
    """A number in a range, or one of a few words (``--processes auto``)."""

    def __init__(self, words: tuple[str, ...], low: int | None, high: int | None) -> None:
        self.words = words
        self.numbers = click.IntRange(low, high)
        self.name = f"[{'|'.join(words)}|{low}-{high}]" if low is not None and high is not None else "INTEGER"

    def get_metavar(self, param: click.Parameter, ctx: click.Context) -> str:
        return self.name  # as written: click would upper-case the word (AUTO), which is not what to type

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and value.strip().lower() in self.words:
            return value.strip().lower()
        try:
            return self.numbers.convert(value, param, ctx)
        except click.BadParameter:
            self.fail(f"{value!r} is neither {' nor '.join(self.words)} nor {self.numbers}.", param, ctx)


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)


def _click_type(o: Option) -> Any:
    if o.choices and o.kind is int:
        return _IntOrWord(o.choices, _int(o.low), _int(o.high))
    if o.choices:
        return click.Choice(o.choices, case_sensitive=not o.ignore_case)
    if o.lines:
        return _Lines()
    if o.kind is int:
        return click.IntRange(_int(o.low), _int(o.high))
    if o.kind is float:
        return _FloatRange(o.low, o.high)
    return click.STRING


# The sections of --help and of the README's table, in this order, each channel's before OPERATIONS
# (run_options). `poller check` lists only the options that are not run_only.
SQS, DELIVERY, EVENTS, OPERATIONS = "SQS", "Delivery", "Events", "Operations"
_sqs = partial(Option, group=SQS)
_delivery = partial(Option, group=DELIVERY)
_events = partial(Option, group=EVENTS, run_only=True)  # check makes no event
_ops = partial(Option, group=OPERATIONS)

POLLER_OPTIONS: tuple[Option, ...] = (
    # -- the queue and how it is polled ----------------------------------------------------------
    _sqs(flag="--queue-url", required=True,
         help="URL of the SQS queue to poll (a queue ARN is turned into its URL)."),
    _sqs(flag="--region", envvars=("AWS_REGION",),
         default_text="the queue URL's region, else AWS_DEFAULT_REGION or the AWS config",
         help="AWS region of the queue."),
    _sqs(flag="--endpoint-url", default_text="AWS_ENDPOINT_URL_SQS, or AWS's",
         help="SQS endpoint, e.g. LocalStack's."),
    _sqs(flag="--profile", default_text="AWS_PROFILE", help="AWS profile."),
    _sqs(flag="--ca-bundle", default_text="AWS_CA_BUNDLE, or ca_bundle in the AWS config; else the system's CAs",
         help="PEM file of the CAs that SQS's certificate is checked against, instead of the system's "
              "(as AWS_CA_BUNDLE is for the AWS CLI)."),
    # 8 and 200 (below): SQS 10-20 ms away, a message is held for about two round trips (its receive,
    # its delete) plus its delivery; one worker keeping ~3,000 msg/s needs ~6 receives of 10 under way
    # and ~180 messages of room (Little's law). 4 and 100 kept 0.5-0.8 of the direct rate 20 ms away.
    # A fixed 8 still queued at a saturated LocalStack 20 ms away (0.70-0.76 of the direct rate), and
    # a fixed 16 queued needlessly on a near one: the window follows the round trip (poller.window).
    _sqs(flag="--receivers", run_only=True, kind=int, low=1, high=64, default=8,
         help="Long-poll ReceiveMessage calls in flight per process, at least."),
    _sqs(flag="--max-receivers", run_only=True, kind=int, low=1, high=64, default=16,
         help="While a backlog waits, a process adds receives beyond --receivers, up to this many: as many "
              "as SQS's round trip calls for at the rate it receives (Little's law). At most --receivers "
              "keeps the count fixed."),
    _sqs(flag="--batch-size", run_only=True, kind=int, low=1, high=10, default=10,
         help="Messages per ReceiveMessage."),
    _sqs(flag="--wait-time", run_only=True, kind=int, low=0, high=20, default=20, help="Long-poll wait, seconds."),
    _sqs(flag="--visibility-timeout", kind=int, low=0, high=43200, default_text="the queue's",
         help="Visibility timeout of received messages, seconds."),
    _sqs(flag="--delete-linger", run_only=True, kind=float, low=0, high=10, default=0.05,
         help="Seconds an acknowledged message may wait for a fuller DeleteMessageBatch."),
    # -- delivery -----------------------------------------------------------------------------
    # its choices are the installed channels' names (run_options)
    _delivery(flag="--channel", dest="channel_name", default="http", help="Where messages go."),
    _delivery(flag="--max-in-flight", run_only=True, kind=int, low=1, high=100_000,
              default_text=str(MAX_IN_FLIGHT),  # run_options adds each channel's own
              help="Messages a process holds at most (delivering, waiting, or acked and not yet deleted); "
                   "receiving pauses above it. Memory: up to this many bodies per process (SQS's limit is "
                   "1 MiB a message)."),
    _delivery(flag="--retries", kind=int, low=0, high=100, default=3,
              help="In-place retries of a failed delivery (with backoff) before the message is returned to "
                   "SQS; not counted while the circuit is open (an outage pauses receiving instead)."),
    _delivery(flag="--max-processing-time", kind=float, low=1, high=43200, default=300.0,
              help="Seconds one delivery attempt may hold a message before it counts as failed; must be above "
                   "the channel's own deadline (--http-timeout; twice Kafka's message.timeout.ms)."),
    _delivery(flag="--max-rate", run_only=True, kind=float, low=0, high=1_000_000, default=0.0,
              help="Messages per second the whole poller hands to the channel at most, to protect a "
                   "subscriber; 0: no limit."),
    _delivery(flag="--nack-backoff", run_only=True, kind=float, low=0, high=3600, default=2.0,
              help="Visibility of a message returned undelivered: this, doubled per receive, seconds."),
    _delivery(flag="--nack-backoff-max", run_only=True, kind=float, low=0, high=43200, default=300.0,
              help="Cap of that visibility, seconds."),
    # -- the events made from the messages ------------------------------------------------------
    _events(flag="--data", dest="data_mode", choices=("message", "body"), default="message",
            help="Event data: the whole SQS message as JSON, or the raw body (application/json when it is a "
                 "JSON object or array and no content-type attribute says otherwise)."),
    _events(flag="--envelope", choices=ENVELOPES, default="none",
            help="Bodies that are an SNS notification, an EventBridge event or an S3 notification (auto: any "
                 "of them) become the events they describe, their id, source and type taken from the body: "
                 "trusts the queue's producers. Other bodies pass unchanged."),
    _events(flag="--ce-type", default_text="aws.sqs.message",
            help="The events' type (e.g. dev.knative.connector.event.aws-sqs); not for bodies an --envelope "
                 "maps."),
    _events(flag="--ce-source", default_text="the queue URL",
            help="The events' source; not for bodies an --envelope maps."),
    # -- operations -----------------------------------------------------------------------------
    _ops(flag="--processes", run_only=True, kind=int, low=1, high=256, choices=("auto",), default="auto",
         help="Worker processes under the supervisor: a number runs exactly that many; auto runs one, adds one "
              "while they are saturated (0.85 of a core each) with a backlog and a CPU to spare, up to "
              "--max-processes, and retires one when the load fits in fewer (see docs/operations.md)."),
    _ops(flag="--max-processes", run_only=True, kind=int, low=1, high=256,
         default_text="the container's CPU quota, rounded up (else the usable CPUs)",
         help="The most workers --processes auto runs."),
    _ops(flag="--shutdown-timeout", run_only=True, kind=float, low=1, high=3600, default=25.0,
         help="On SIGTERM/SIGINT, seconds to finish in-flight work before workers are killed (below "
              "Kubernetes' default 30 s grace)."),
    _ops(flag="--worker-timeout", run_only=True, kind=float, low=5, high=3600, default=60.0,
         help="Seconds without a heartbeat after which the supervisor kills and replaces a worker."),
    _ops(flag="--until-empty", run_only=True, kind=bool,
         help="Batch mode: exit 0 once the queue is drained (receives empty for a short while and "
              "everything delivered and deleted)."),
    _ops(flag="--max-messages", run_only=True, kind=int, low=1, high=10**12,
         help="Batch mode: stop after this many messages were received (then drain as on SIGTERM)."),
    _ops(flag="--max-duration", run_only=True, kind=float, low=1, default_text="off",
         help="Stop after this many seconds of running (then drain as on SIGTERM and exit 0), e.g. to end "
              "a batch run before its Job's activeDeadlineSeconds."),
    _ops(flag="--stats-interval", run_only=True, kind=float, low=0.1, default=10.0,
         help="Seconds between throughput log lines (none while idle)."),
    _ops(flag="--log-level", choices=LOG_LEVELS, ignore_case=True, default="INFO",
         help="Log level; logs go to stderr."),
    _ops(flag="--log-format", choices=LOG_FORMATS, default="text",
         help="Log lines as text, or one JSON object per line for log shippers."),
    _ops(flag="--metrics-port", run_only=True, kind=int, low=1, high=65535, default_text="off",
         help="Serve Prometheus /metrics, and /healthz and /readyz, on this port."),
    _ops(flag="--metrics-host", run_only=True, default="127.0.0.1",
         help="Address for --metrics-port and --health-port (0.0.0.0 to let Prometheus or the kubelet in)."),
    _ops(flag="--health-port", run_only=True, kind=int, low=1, high=65535, default_text="off",
         help="Serve /healthz and /readyz on this port (when there is no --metrics-port)."),
)

_BY_FLAG = {o.flag: o for o in POLLER_OPTIONS}


def installed_channels() -> Registry:
    """The channels installed with the poller or beside it (entry points ``sqs_poller.channels``)."""
    return load_channels(reserved=POLLER_OPTIONS)


def run_options(channels: Registry) -> tuple[Option, ...]:
    """The options of ``poller run`` with these channels, in the order of --help's sections: the
    poller's own, each channel's before the poller's operations."""
    own = tuple(replace(o, choices=channels.names()) if o.flag == "--channel"
                else _with_channel_rooms(o, channels) if o.flag == "--max-in-flight" else o for o in POLLER_OPTIONS)
    late = tuple(o for o in own if o.group == OPERATIONS)
    return (*(o for o in own if o.group != OPERATIONS), *channels.options(), *late)


def _with_channel_rooms(o: Option, channels: Registry) -> Option:
    """``--max-in-flight``'s shown default with each channel's own (``ChannelPlugin.max_in_flight``),
    which ``poller.boot`` takes when the flag is not given: "200; the kafka channel's 400"."""
    rooms = [f"the {name} channel's {plugin.max_in_flight}" for name, plugin in channels.channels.items()
             if plugin.max_in_flight is not None]
    return replace(o, default_text="; ".join([o.shown_default(), *rooms]))


def group_of(o: Option) -> str:
    """The section of --help (and of the README's table) an option is listed in."""
    if o.channel:
        return f"With --channel {o.channel}"
    return o.group or "Other options"


def __getattr__(name: str) -> Any:
    # RUN_OPTIONS: every flag of `poller run` as installed, made when asked for (it imports the
    # channels' declarations, which the workers' range checks do not need).
    if name == "RUN_OPTIONS":
        return run_options(installed_channels())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def option(flag: str) -> Option:
    """The declaration of one of the poller's own flags."""
    return _BY_FLAG[flag]


class _FloatRange(click.FloatRange):
    """click's FloatRange, which takes "nan": it compares false with both bounds."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if number != number:
            self.fail(f"{value!r} is not a number.", param, ctx)
        return number


def check(flag: str, value: Any) -> None:
    """The range check of the poller's own ``flag`` (for ``poller.config``)."""
    _BY_FLAG[flag].check(value)


def apply(options: Iterable[Option], *, for_check: bool = False) -> Callable[[Any], Any]:
    """Decorate a (cloup) command with these options, in order, each in its section of --help.
    ``for_check``: the options ``poller check`` does not use are taken (a run's flags can be
    checked as they are) but not listed."""
    import cloup  # only the CLI needs it: the workers import this module for the range checks

    declared = list(options)

    def decorate(command: Any) -> Any:
        groups: dict[str, cloup.OptionGroup] = {}  # one per command: a group knows its options
        for o in declared:
            groups.setdefault(group_of(o), cloup.OptionGroup(group_of(o)))
        for o in reversed(declared):
            hidden = for_check and o.run_only
            command = _click_option(o, groups[group_of(o)], hidden)(command)
        return command

    return decorate


def _help(o: Option) -> str:
    """The help without the "HTTP channel: " its section's title says already."""
    if o.channel:
        short = re.sub(rf"^{re.escape(o.channel)} channel(: |, )", "", o.help, flags=re.I)
        if short != o.help and re.match(r"[a-z]+ ", short):  # a word, not "host:port"
            return short[:1].upper() + short[1:]
        return short
    return o.help


def _click_option(o: Option, group: cloup.OptionGroup, hidden: bool) -> Callable[[Any], Any]:
    import cloup

    kwargs: dict[str, Any] = {
        "envvar": [o.env, *o.envvars], "show_envvar": True, "help": _help(o),
        "required": o.required, "multiple": o.multiple, "hidden": hidden,
    }
    if o.kind is bool:
        kwargs.update(is_flag=True, default=False)
    else:
        kwargs["type"] = _click_type(o)
        # Only a real default: click >= 8.3 takes an explicit None as a value, and a required
        # option with a "value" is never missing.
        if o.multiple:
            kwargs["default"] = ()
        elif o.default is not None:
            kwargs["default"] = o.default
        if o.lines:
            kwargs["metavar"] = "KEY=VALUE"
        if o.metavar:
            kwargs["metavar"] = o.metavar
    if o.default_text and o.default_text != "off":
        kwargs["help"] = f"{kwargs['help']} [default: {o.default_text}]"
        kwargs["show_default"] = False
    else:
        kwargs["show_default"] = o.default is not None and o.kind is not bool
    return cloup.option(o.flag, o.name, group=group, **kwargs)


_FLAG_WITH_VALUE = re.compile(r"--[a-z-]+ [a-z0-9_-]+")  # "--channel http" in a section's title


def markdown_table(options: Sequence[Option] | None = None) -> str:
    """The README's flag table: flag, environment variable, default, what it does; by default
    with the poller's own channels only, whatever else is installed."""
    if options is None:
        options = run_options(installed_channels().own())
    lines = ["| flag | env | default | |", "|---|---|---|---|"]
    section = None
    for o in options:
        if group_of(o) != section:  # a row that names the section, as --help does
            section = group_of(o)
            title = _FLAG_WITH_VALUE.sub(lambda m: f"`{m[0]}`", section)
            lines.append(f"| **{title}** | | | |")
        envs = ", ".join(f"`{e}`" for e in (o.env, *o.envvars))
        rng = ""
        if o.kind in (int, float) and (o.low is not None or o.high is not None):
            rng = (f" ({number_text(o.low)}-{number_text(o.high)})" if o.high is not None
                   else f" (>= {number_text(o.low)})")
        choices = f" (`{'`, `'.join(o.choices)}`)" if o.choices and len(o.choices) <= 4 else ""
        lines.append(f"| `{o.flag}` | {envs} | {o.shown_default()} | {_help(o)}{rng}{choices} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(markdown_table() + "\n")
