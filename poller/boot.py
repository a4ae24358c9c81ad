"""What ``poller run`` and ``poller check`` do before anything starts: the ``Plan`` made from the
flags, the checks of the queue and the channel, and ``BootError`` when they fail.

Bad input is a ``click.UsageError`` (exit 2); a queue or channel that cannot be used is a
``BootError`` (exit 3, ``poller.exits``). Either is one line, never a traceback, also when a
channel from another distribution misbehaves.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import click
from click.core import ParameterSource

from channels.base import ChannelConfig, ChannelError
from channels.events import EventShape, parse_overrides
from channels.http import check_url
from channels.plugin import BuildContext, ChannelPlugin, start_and_close
from channels.registry import Registry
from channels.transport.proxy import route_for
from poller.config import MAX_IN_FLIGHT, RunConfig, WorkerConfig, check_attempt_bound
from poller.cpus import default_processes
from poller.exits import EXIT_BOOT
from poller.logs import setup_logging
from poller.sqs import (
    ACCESS_CODES,
    CREDENTIAL_CODES,
    PERMISSION_PROBES,
    BlockingSqsClient,
    PermissionProbe,
    SqsError,
    SqsTarget,
    queue_url_from_arn,
    region_from_queue_url,
    region_mismatch,
    resolve_target,
    ssl_context,
)

__all__ = ["BootError", "Plan", "check_channel", "describe_channel", "make_plan", "probe_channel",
           "region_warning"]

log = logging.getLogger("poller")


class BootError(click.ClickException):
    """The poller cannot start: SQS or the channel is unusable. Exit 3."""

    exit_code = EXIT_BOOT


@dataclass(frozen=True, slots=True)
class Plan:
    """What ``run`` and ``check`` work from, once every flag and the queue were checked."""

    target: SqsTarget
    channel: ChannelConfig
    attributes: dict[str, str]
    config: RunConfig
    notes: tuple[str, ...]  # logged at the start, once logging may begin
    warnings: tuple[str, ...]
    plugin: ChannelPlugin  # what made ``channel``: describes and probes it


def make_plan(opts: dict[str, Any], channels: Registry, *, reach_queue: bool = True) -> Plan:
    """Check every flag (usage errors first, before SQS is asked anything), then the queue."""
    ctx = click.get_current_context()
    setup_logging(opts["log_level"].upper(), opts["log_format"])
    notes: list[str] = []
    warnings: list[str] = []
    queue_url = opts["queue_url"]
    from_arn = queue_url_from_arn(queue_url)
    if from_arn:
        notes.append(f"queue ARN {queue_url} -> queue URL {from_arn}")
        opts["queue_url"] = queue_url = from_arn
    elif queue_url.startswith("arn:"):
        raise click.UsageError(f"--queue-url {queue_url!r} is an ARN but not an SQS queue's "
                               "(arn:aws:sqs:REGION:ACCOUNT:NAME)")
    check_url(queue_url, "queue")
    try:
        plugin = channels.get(opts["channel_name"])
    except LookupError as exc:  # installed but unusable (broken, or its name taken twice)
        raise BootError(str(exc)) from None
    warnings.extend(channels.warnings())  # installed channels that cannot be used, not chosen
    _refuse_other_channels_flags(ctx, channels, plugin.name)
    channel = _channel_config(plugin, opts, ctx)
    try:  # a usage error, before SQS is asked anything
        check_attempt_bound(opts["max_processing_time"], channel, plugin.deadline)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    target = _resolve(opts)
    mismatch = region_warning(target)
    if mismatch:
        warnings.append(mismatch)
    try:  # the route (a proxy URL this client cannot use) and the CA bundle, before SQS is asked
        route = route_for(target.endpoint_url)
        if target.endpoint_url.startswith("https:") or opts["ca_bundle"]:
            ssl_context(target.ca_bundle)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if route.proxy is not None or route.bypassed:
        notes.append(f"SQS {target.endpoint_url}: {route}")
    try:
        attributes = _check_queue(target) if reach_queue else {}
    except BootError as exc:
        if mismatch:  # most likely why the queue cannot be found
            raise BootError(f"{exc.message}; {mismatch}") from None
        raise
    processes, autoscale, why = _processes(opts)
    if opts["max_processes"] and opts["processes"] != "auto":
        warnings.append(f"--max-processes is for --processes auto: ignored with --processes {opts['processes']}")
    notes.append(f"worker processes: {'auto, 1 to ' if autoscale else ''}{processes} ({why})")
    try:
        worker = WorkerConfig(
            target=target,
            channel=channel,
            receivers=opts["receivers"],
            max_receivers=opts["max_receivers"],
            batch_size=opts["batch_size"],
            wait_time=opts["wait_time"],
            visibility_timeout=opts["visibility_timeout"],
            queue_visibility_timeout=int(attributes.get("VisibilityTimeout", 30)),
            max_in_flight=opts["max_in_flight"] or plugin.max_in_flight or MAX_IN_FLIGHT,
            delete_linger=opts["delete_linger"],
            nack_backoff=opts["nack_backoff"],
            nack_backoff_max=opts["nack_backoff_max"],
            retries=opts["retries"],
            max_processing_time=opts["max_processing_time"],
            max_rate=opts["max_rate"] / processes,
            until_empty=opts["until_empty"],
            shutdown_timeout=opts["shutdown_timeout"],
            log_level=opts["log_level"].upper(),
            log_format=opts["log_format"],
        )
        config = RunConfig(worker=worker, processes=processes, autoscale=autoscale,
                           shutdown_timeout=opts["shutdown_timeout"],
                           stats_interval=opts["stats_interval"],
                           worker_timeout=opts["worker_timeout"],
                           until_empty=opts["until_empty"], max_messages=opts["max_messages"],
                           max_duration=opts["max_duration"],
                           metrics_port=opts["metrics_port"], health_port=opts["health_port"],
                           metrics_host=opts["metrics_host"])
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if reach_queue and "RedrivePolicy" not in attributes:
        warnings.append("queue has no redrive policy: rejected messages will be redelivered until they "
                        f"expire (retention {attributes.get('MessageRetentionPeriod', '?')} s)")
    return Plan(target, channel, attributes, config, tuple(notes), tuple(warnings), plugin)


def _processes(opts: dict[str, Any]) -> tuple[int, bool, str]:
    """(workers, or the most with auto; auto; why that many) from --processes, --max-processes."""
    if opts["processes"] != "auto":
        return opts["processes"], False, "--processes"
    most, why = (opts["max_processes"], "--max-processes") if opts["max_processes"] else default_processes()
    if opts["max_rate"]:  # the limit is split across the workers: their number must not change
        return most, False, f"{why}; fixed, since --max-rate splits its rate across them"
    return most, most > 1, why


def region_warning(target: SqsTarget) -> str | None:
    """Why the region the poller talks to may be the wrong one: the queue URL names another."""
    mismatch = region_mismatch(target)
    if mismatch is None:
        return None
    return (f"the queue URL is in {mismatch} but the region is {target.region} "
            "(--region / AWS_REGION): requests go to that region's endpoint")


def _refuse_other_channels_flags(ctx: click.Context, channels: Registry, channel: str) -> None:
    """A flag of another channel on the command line is a mistake, not something to ignore."""
    for o in channels.options():
        if o.channel != channel and ctx.get_parameter_source(o.name) is ParameterSource.COMMANDLINE:
            raise click.UsageError(f"{o.flag} is a flag of the {o.channel} channel, but the channel is "
                                   f"{channel}: pass --channel {o.channel}")


def _channel_config(plugin: ChannelPlugin, opts: dict[str, Any], ctx: click.Context) -> ChannelConfig:
    queue_url = opts["queue_url"]
    try:
        context = BuildContext(
            values={o.name: opts[o.name] for o in plugin.options},
            data_mode=opts["data_mode"],
            overrides=parse_overrides(os.environ.get("K_CE_OVERRIDES")),
            shape=EventShape(envelope=opts["envelope"], type=opts["ce_type"] or "", source=opts["ce_source"] or ""),
            region=opts["region"] or region_from_queue_url(queue_url),
            profile=opts["profile"],
            from_environment=frozenset(o.name for o in plugin.options
                                       if ctx.get_parameter_source(o.name) is ParameterSource.ENVIRONMENT),
        )
        return plugin.build(context)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - a channel's own bug: still one line
        raise BootError(f"{plugin.name} channel: cannot make its config: {_one_line(exc)}") from None


def _resolve(opts: dict[str, Any]) -> SqsTarget:
    if opts["endpoint_url"]:
        check_url(opts["endpoint_url"], "endpoint")
    try:
        return resolve_target(opts["queue_url"], region=opts["region"],
                              endpoint_url=opts["endpoint_url"], profile=opts["profile"],
                              ca_bundle=opts["ca_bundle"])
    except ValueError as exc:
        raise BootError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - botocore's ProfileNotFound and friends
        raise BootError(f"cannot configure AWS: {exc}") from None


def _check_queue(target: SqsTarget) -> dict[str, str]:
    """GetQueueAttributes once before any worker starts, then whether the credentials may delete
    and change the visibility of messages (``PERMISSION_PROBES``): a clear error beats N crashing
    workers, and a role that may not delete would get every message redelivered until the DLQ
    took it."""
    try:
        client = BlockingSqsClient(target)
    except ValueError as exc:
        raise BootError(str(exc)) from None
    try:
        try:
            attributes = client.queue_attributes()
        except SqsError as exc:
            if exc.code in ("QueueDoesNotExist", "AWS.SimpleQueueService.NonExistentQueue"):
                raise BootError(f"queue {target.queue_url} does not exist (region {target.region}, "
                                f"endpoint {target.endpoint_url})") from None
            if exc.code in ACCESS_CODES:
                raise BootError(f"the credentials may not sqs:GetQueueAttributes on {target.queue_url}: "
                                f"{exc}") from None
            raise _sqs_boot_error(target, exc, "cannot read the queue's attributes") from None
        for probe in PERMISSION_PROBES:
            _check_permission(client, target, probe)
        return attributes
    finally:
        client.close()


def _check_permission(client: BlockingSqsClient, target: SqsTarget, probe: PermissionProbe) -> None:
    """One harmless call (a made-up receipt handle, ``SqsClient.probe``); BootError if not allowed."""
    try:
        client.probe(probe)
    except SqsError as exc:
        if exc.code in ACCESS_CODES:
            raise BootError(f"the credentials may not {probe.permission} on {target.queue_url}: {exc}") from None
        raise _sqs_boot_error(target, exc, f"cannot check {probe.permission} on {target.queue_url}") from None


def _sqs_boot_error(target: SqsTarget, exc: SqsError, what: str) -> BootError:
    if exc.code in CREDENTIAL_CODES:
        return BootError(f"AWS rejected the credentials: {exc}")
    if exc.code in ("ConnectionError", "Timeout"):
        return BootError(f"cannot reach SQS at {target.endpoint_url}: {exc}")
    return BootError(f"{what}: {exc}")


def check_channel(plan: Plan) -> None:
    """Start the channel once and close it (``run``'s check before the workers start)."""
    try:
        start_and_close(plan.channel, plan.target.queue_url)
    except ChannelError as exc:
        raise BootError(f"{plan.plugin.name} channel: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a channel's own bug: still one line
        raise BootError(f"{plan.plugin.name} channel cannot start: {_one_line(exc)}") from None


def probe_channel(plan: Plan) -> tuple[str, str]:
    """``poller check``'s proof that the sink is there: ``(what, detail)`` for the report."""
    probe = plan.plugin.probe
    try:
        if probe is None:
            start_and_close(plan.channel, plan.target.queue_url)
            return plan.plugin.name, "the channel started and closed"
        return probe(plan.channel, plan.target.queue_url)
    except ChannelError as exc:
        raise BootError(f"{plan.plugin.name} channel: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a channel's own bug: still one line
        raise BootError(f"{plan.plugin.name} channel: its check failed: {_one_line(exc)}") from None


def describe_channel(plan: Plan) -> str:
    """The channel's own words for the start's log line (where events go, without secrets)."""
    try:
        return plan.plugin.describe(plan.channel)
    except Exception as exc:  # noqa: BLE001 - a log line is not worth failing the start for
        log.debug("the %s channel cannot describe itself: %s", plan.plugin.name, _one_line(exc))
        return ""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else '(no message)'}"
