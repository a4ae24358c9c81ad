"""The ``poller`` command: ``run``, ``check``, ``demo``, ``channel``, ``dump``.

The options of ``run`` and ``check`` are declared once, in ``poller.options``; each has an
environment variable (``POLLER_<FLAG>``). AWS settings come the AWS way (default credential
chain, ``AWS_REGION``, ``AWS_ENDPOINT_URL_SQS``). Bad input ends in one line on stderr and a
non-zero exit, never a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

import click

from click.core import ParameterSource

from channels.base import ChannelConfig, ChannelError
from channels.events import parse_overrides
from channels.http import HttpConfig, check_url, redact
from poller.config import RunConfig, WorkerConfig, check_attempt_bound
from poller.cpus import default_processes
from poller.logs import setup_logging
from poller.options import RUN_OPTIONS, apply
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
)

__all__ = ["Plan", "main"]

DISTRIBUTION = "sqs-cloudevents-poller"

EXIT_USAGE = 2
EXIT_BOOT = 3
EXIT_INTERRUPTED = 130

log = logging.getLogger("poller")


class BootError(click.ClickException):
    """The poller cannot start: SQS or the channel is unusable. Exit 3."""

    exit_code = EXIT_BOOT


@click.group(invoke_without_command=True,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name=DISTRIBUTION, prog_name="poller")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Poll Amazon SQS and forward every message, as a CloudEvent, to a channel.

    Messages are deleted from SQS only after the channel acknowledged them (at least once).
    Start with `poller demo` to see it work locally, `poller run --help` for the options.
    """
    if ctx.invoked_subcommand is None:  # `poller` alone: the help, not an error
        click.echo(ctx.get_help())


RUN_EXAMPLES = """\b
Examples:
  poller run --queue-url https://sqs.us-east-1.amazonaws.com/123456789012/orders \\
             --sink http://127.0.0.1:8080/
  K_SINK=http://broker-ingress/default/orders poller run --queue-url "$QUEUE_URL"
  poller run --queue-url "$QUEUE_URL" --channel kafka --kafka-topic orders \\
             --kafka-bootstrap-servers b-1.mycluster.kafka.us-east-1.amazonaws.com:9098 --kafka-auth iam
  poller run --queue-url "$QUEUE_URL" --sink http://127.0.0.1:8080/ --until-empty
  poller check --queue-url "$QUEUE_URL" --sink http://127.0.0.1:8080/

\b
Every option is also an environment variable (shown with it). Shell completion:
  eval "$(_POLLER_COMPLETE=bash_source poller)"    (zsh: zsh_source, fish: fish_source)
"""


# -- run ----------------------------------------------------------------------------------


@cli.command(epilog=RUN_EXAMPLES)
@apply(RUN_OPTIONS)
def run(**opts: Any) -> int:
    """Poll one SQS queue and publish every message to the channel.

    Runs --processes worker processes under a supervisor that restarts any that dies. Each
    message is deleted from SQS only after the channel acknowledged it; a failed delivery is
    retried in place, a rejected one is left to the queue's redrive policy (DLQ).
    """
    plan = _plan(opts)
    check_channel(plan.channel, plan.target.queue_url)
    from poller.supervisor import Supervisor  # imported late: keeps --help fast

    supervisor = Supervisor(plan.config)
    port = plan.config.metrics_port or plan.config.health_port
    if port is not None:
        try:
            supervisor.serve_http(plan.config.metrics_host, port, metrics=plan.config.metrics_port is not None)
        except OSError as exc:
            raise BootError(f"cannot serve on {plan.config.metrics_host}:{port}: {exc.strerror or exc}") from None
    # Logging starts only here, once every start check passed: a bad start stays one line.
    for line in plan.notes:
        log.info("%s", line)
    for line in plan.warnings:
        log.warning("%s", line)
    fifo = plan.attributes.get("FifoQueue") == "true"
    log.info("polling %s%s (region %s, endpoint %s) -> %s channel %s with %d process(es)",
             plan.target.queue_url, " (FIFO)" if fifo else "", plan.target.region, plan.target.endpoint_url,
             plan.channel.name, _describe(plan.channel), plan.config.processes)
    return supervisor.run()


@dataclass(frozen=True, slots=True)
class Plan:
    """What ``run`` and ``check`` work from, once every flag and the queue were checked."""

    target: SqsTarget
    channel: ChannelConfig
    attributes: dict[str, str]
    config: RunConfig
    notes: tuple[str, ...]  # logged at the start, once logging may begin
    warnings: tuple[str, ...]


def _plan(opts: dict[str, Any], *, reach_queue: bool = True) -> Plan:
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
    _refuse_other_channels_flags(ctx, opts["channel_name"])
    channel = _channel_config(opts)
    try:  # a usage error, before SQS is asked anything
        check_attempt_bound(opts["max_processing_time"], channel)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    target = _resolve(opts)
    mismatch = region_mismatch(target)
    if mismatch:
        warnings.append(f"the queue URL is in {mismatch} but the region is {target.region} "
                        "(--region / AWS_REGION): requests go to that region's endpoint")
    attributes = _check_queue(target) if reach_queue else {}
    processes, why = (opts["processes"], "--processes") if opts["processes"] else default_processes()
    notes.append(f"{processes} worker process(es): {why}")
    try:
        worker = WorkerConfig(
            target=target,
            channel=channel,
            receivers=opts["receivers"],
            batch_size=opts["batch_size"],
            wait_time=opts["wait_time"],
            visibility_timeout=opts["visibility_timeout"],
            queue_visibility_timeout=int(attributes.get("VisibilityTimeout", 30)),
            max_in_flight=opts["max_in_flight"],
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
        config = RunConfig(worker=worker, processes=processes,
                           shutdown_timeout=opts["shutdown_timeout"],
                           stats_interval=opts["stats_interval"],
                           worker_timeout=opts["worker_timeout"],
                           until_empty=opts["until_empty"], max_messages=opts["max_messages"],
                           metrics_port=opts["metrics_port"], health_port=opts["health_port"],
                           metrics_host=opts["metrics_host"])
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if reach_queue and "RedrivePolicy" not in attributes:
        warnings.append("queue has no redrive policy: rejected messages will be redelivered until they "
                        f"expire (retention {attributes.get('MessageRetentionPeriod', '?')} s)")
    return Plan(target, channel, attributes, config, tuple(notes), tuple(warnings))


def _refuse_other_channels_flags(ctx: click.Context, channel: str) -> None:
    """A flag of the other channel on the command line is a mistake, not something to ignore."""
    for o in RUN_OPTIONS:
        if o.channel and o.channel != channel and ctx.get_parameter_source(o.name) is ParameterSource.COMMANDLINE:
            raise click.UsageError(f"{o.flag} is a flag of the {o.channel} channel, but the channel is "
                                   f"{channel}: pass --channel {o.channel}")


def _channel_config(opts: dict[str, Any]) -> ChannelConfig:
    try:
        overrides = parse_overrides(os.environ.get("K_CE_OVERRIDES"))
        if opts["channel_name"] == "http":
            if not opts["sink"]:
                raise click.UsageError("the http channel needs a sink: pass --sink URL or set K_SINK")
            return HttpConfig(
                sink=opts["sink"], mode=opts["http_mode"], data_mode=opts["data_mode"],
                overrides=overrides, concurrency=opts["http_concurrency"],
                timeout=opts["http_timeout"], batch_size=opts["http_batch_size"],
            )
        from channels.kafka import KafkaConfig

        for flag in ("kafka_bootstrap_servers", "kafka_topic"):
            if not opts[flag]:
                raise click.UsageError(f"the kafka channel needs --{flag.replace('_', '-')}")
        return KafkaConfig(
            bootstrap_servers=opts["kafka_bootstrap_servers"], topic=opts["kafka_topic"],
            format=opts["kafka_format"], data_mode=opts["data_mode"], key=opts["kafka_key"],
            auth=opts["kafka_auth"], timestamp=opts["kafka_timestamp"],
            extra=_kafka_config(opts["kafka_config"]),
            overrides=tuple(overrides.items()), create_topic=opts["kafka_create_topic"],
            partitions=opts["kafka_partitions"], replication=opts["kafka_replication"],
            region=opts["kafka_region"] or opts["region"] or region_from_queue_url(opts["queue_url"]),
            profile=opts["profile"],
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


def _kafka_config(items: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """--kafka-config pairs; from POLLER_KAFKA_CONFIG, errors name the line (never the value)."""
    from channels.kafka import parse_kafka_config, parse_kafka_config_env

    source = click.get_current_context().get_parameter_source("kafka_config")
    if source is click.core.ParameterSource.ENVIRONMENT:
        return parse_kafka_config_env("\n".join(items))
    return parse_kafka_config(items)


def _resolve(opts: dict[str, Any]) -> SqsTarget:
    if opts["endpoint_url"]:
        check_url(opts["endpoint_url"], "endpoint")
    try:
        return resolve_target(opts["queue_url"], region=opts["region"],
                              endpoint_url=opts["endpoint_url"], profile=opts["profile"])
    except ValueError as exc:
        raise BootError(str(exc)) from None
    except Exception as exc:  # botocore's ProfileNotFound and friends
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


def check_channel(config: ChannelConfig, source: str) -> None:
    """Start the channel once and close it (``run``'s check before it starts, and ``check``)."""
    async def check() -> None:
        channel = config.create(source)
        try:
            channel.start()
        finally:
            await channel.aclose(timeout=5.0)

    try:
        asyncio.run(check())
    except ChannelError as exc:
        raise BootError(f"{config.name} channel: {exc}") from None


def _describe(config: ChannelConfig) -> str:
    if isinstance(config, HttpConfig):
        return f"sink {redact(config.sink)} ({config.mode}, data={config.data_mode})"
    return f"{getattr(config, 'bootstrap_servers', '')} topic {getattr(config, 'topic', '')}"


# -- check -----------------------------------------------------------------------------------


@cli.command(epilog="Exit 0 when everything answered; the first failure is one line and exit 3.")
@apply(RUN_OPTIONS)
def check(**opts: Any) -> int:
    """Check what `poller run` would use, with the same flags, and print a short report.

    Credentials, the queue (visibility timeout, redrive policy and DLQ, FIFO, depth), the
    permissions to delete and to change visibility (a call with a made-up receipt handle), and
    the sink (an OPTIONS request) or the Kafka broker and topic. Warns when the visibility
    timeout is shorter than a delivery may take, and when there is no DLQ.
    """
    from poller.check import run_check

    plan = _plan(opts)
    return run_check(plan, opts)


# -- demo -------------------------------------------------------------------------------------


@cli.command("demo")
@click.option("--endpoint-url", envvar="AWS_ENDPOINT_URL_SQS", show_envvar=True, default=None,
              help="Use this SQS endpoint instead of starting one.")
@click.option("--messages", type=click.IntRange(0, 10_000), default=5, show_default=True,
              help="Sample messages to send at the start.")
@click.option("--follow", is_flag=True, help="Keep sending one message a second.")
@click.option("--duration", type=click.FloatRange(0), default=None,
              help="Stop after this many seconds [default: run until Ctrl-C].")
@click.option("--processes", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Worker processes of the poller.")
def demo_cmd(endpoint_url: str | None, messages: int, follow: bool, duration: float | None,
             processes: int) -> int:
    """Run the whole pipeline locally and watch messages flow.

    Starts a local SQS (the --endpoint-url given, else Docker's LocalStack if Docker answers,
    else LocalStack installed on this host on first use, else moto's server), a queue with a
    DLQ, an in-memory channel, a message dumper and `poller run`; sends sample messages and
    prints each event as the dumper receives it. Ctrl-C stops everything it started.
    """
    if endpoint_url:
        check_url(endpoint_url, "endpoint")
        from poller.kit.localsqs import check_endpoint
        from poller.kit.process import ServiceError

        try:  # before any log line: a dead endpoint is one line, as every bad input
            check_endpoint(endpoint_url)
        except ServiceError as exc:
            raise BootError(str(exc)) from None
    setup_logging("INFO")
    from poller.kit.demo import DemoOptions, run_demo

    return run_demo(DemoOptions(endpoint_url=endpoint_url, messages=messages, follow=follow,
                                duration=duration, processes=processes))


# -- the local side: in-memory channel and message dumper -----------------------------------


@cli.command("channel")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="Port to listen on (127.0.0.1 unless --host).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--subscriber", "subscribers", multiple=True, required=True, metavar="URL",
              help="Where each event goes; repeatable.")
def channel_cmd(port: int, host: str, subscribers: tuple[str, ...]) -> int:
    """An in-memory CloudEvents channel: fans each event out to every subscriber.

    Answers 2xx only after every subscriber answered 2xx, so the poller deletes only what
    reached them all. It keeps nothing: events in transit are lost on a restart of the
    channel, but the poller has not deleted them, so SQS delivers them again.
    """
    setup_logging("INFO")
    for url in subscribers:
        try:
            check_url(url, "subscriber")
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
    from poller.kit.inmemory import serve_channel

    try:
        serve_channel(port, list(subscribers), host=host)
    except OSError as exc:  # port taken, bad address
        raise BootError(f"in-memory channel: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    except (ValueError, RuntimeError) as exc:  # server died
        raise BootError(f"in-memory channel: {exc}") from None
    return 0


@cli.command("dump")
@click.option("--port", type=click.IntRange(0, 65535), default=8081, show_default=True,
              help="Port to listen on (127.0.0.1 unless --host).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--pretty", is_flag=True, help="Indented JSON instead of one line per event.")
def dump_cmd(port: int, host: str, pretty: bool) -> int:
    """The message dumper: prints every CloudEvent it receives and answers 2xx."""
    setup_logging("INFO")
    from poller.kit.dumper import serve_dumper

    try:
        serve_dumper(port, pretty, host=host)
    except OSError as exc:  # port taken, bad address
        raise BootError(f"message dumper: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    except (ValueError, RuntimeError) as exc:
        raise BootError(f"message dumper: {exc}") from None
    return 0


# -- entry point ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    try:
        result = cli.main(args=argv, prog_name="poller", standalone_mode=False)
    except click.ClickException as exc:
        click.echo(f"poller: error: {exc.format_message()}", err=True)
        return exc.exit_code
    except click.Abort:
        click.echo("poller: interrupted", err=True)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except ValueError as exc:  # a config check that escaped: still one line
        click.echo(f"poller: error: {exc}", err=True)
        return EXIT_USAGE
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
