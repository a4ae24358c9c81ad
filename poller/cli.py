"""The ``poller`` command: ``run``, ``demo``, ``channel``, ``dump``.

Every flag of ``run`` has an environment variable (``POLLER_<FLAG>``); AWS settings come the AWS
way (default credential chain, ``AWS_REGION``, ``AWS_ENDPOINT_URL_SQS``). Bad input ends in one
line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from channels.base import ChannelConfig, ChannelError
from channels.events import parse_overrides
from channels.http import HttpConfig, check_url, redact
from poller.config import RunConfig, WorkerConfig
from poller.logs import LOG_LEVELS, setup_logging
from poller.sqs import CREDENTIAL_CODES, BlockingSqsClient, SqsError, SqsTarget, resolve_target

__all__ = ["main"]

EXIT_USAGE = 2
EXIT_BOOT = 3
EXIT_INTERRUPTED = 130

log = logging.getLogger("poller")


class BootError(click.ClickException):
    """The poller cannot start: SQS or the channel is unusable. Exit 3."""

    exit_code = EXIT_BOOT


class _Lines(click.ParamType):
    """A string whose environment variable holds one value per line: click splits a multiple
    option's variable on whitespace by default, which would cut a value (a password) in two."""

    name = "KEY=VALUE"
    envvar_list_splitter = "\n"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        return value


def option(*decls: str, **kwargs: Any) -> Callable[[Any], Any]:
    """A click option whose env var is POLLER_<LONG_NAME>, shown in --help with its default."""
    long_name = next(d for d in decls if d.startswith("--"))
    env = [f"POLLER_{long_name[2:].upper().replace('-', '_')}"] + kwargs.pop("extra_env", [])
    kwargs.setdefault("show_default", True)
    return click.option(*decls, envvar=env, show_envvar=True, **kwargs)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="sqs-poller", prog_name="poller")
def cli() -> None:
    """Poll Amazon SQS and forward every message, as a CloudEvent, to a channel.

    Messages are deleted from SQS only after the channel acknowledged them (at least once).
    """


# -- run ----------------------------------------------------------------------------------


@cli.command()
@option("--queue-url", required=True, help="URL of the SQS queue to poll.")
@option("--region", extra_env=["AWS_REGION"], default=None, show_default=False,
        help="AWS region [default: AWS_DEFAULT_REGION, the AWS config, or the queue URL's region].")
@option("--endpoint-url", default=None, show_default=False,
        help="SQS endpoint, e.g. LocalStack's [default: AWS_ENDPOINT_URL_SQS, or AWS's].")
@option("--profile", default=None, show_default=False, help="AWS profile [default: AWS_PROFILE].")
@option("--channel", "channel_name", type=click.Choice(["http", "kafka"]), default="http",
        help="Where messages go.")
@option("--processes", type=click.IntRange(1, 256), default=os.cpu_count() or 1,
        help="Worker processes [default: the CPU count].", show_default=False)
@option("--receivers", type=click.IntRange(1, 64), default=4,
        help="Concurrent long-poll receives per process.")
@option("--batch-size", type=click.IntRange(1, 10), default=10, help="Messages per ReceiveMessage.")
@option("--wait-time", type=click.IntRange(0, 20), default=20, help="Long-poll wait, seconds.")
@option("--visibility-timeout", type=click.IntRange(0, 43200), default=None, show_default=False,
        help="Visibility timeout for received messages, seconds [default: the queue's].")
@option("--max-in-flight", type=click.IntRange(1, 100_000), default=100,
        help="Messages a process holds at most; receiving pauses above it.")
@option("--shutdown-timeout", type=click.FloatRange(1, 3600), default=30.0,
        help="On SIGTERM/SIGINT, seconds to finish in-flight work before workers are killed.")
@option("--retries", type=click.IntRange(0, 100), default=3,
        help="Delivery retries of a message, in place and with backoff, before it is returned to "
             "SQS (not counted while the circuit is open: an outage pauses receiving instead).")
@option("--max-rate", type=click.FloatRange(0, 1_000_000), default=0.0,
        help="Messages per second the whole poller hands to the channel at most, to protect a "
             "subscriber (0: no limit).")
@option("--max-processing-time", type=click.FloatRange(1, 43200), default=300.0,
        help="Seconds one delivery attempt may hold a message before it is returned to SQS.")
@option("--nack-backoff", type=click.FloatRange(0, 3600), default=2.0,
        help="Base visibility backoff of a message returned undelivered, seconds; doubles per receive.")
@option("--nack-backoff-max", type=click.FloatRange(0, 43200), default=300.0,
        help="Cap of the visibility backoff, seconds.")
@option("--worker-timeout", type=click.FloatRange(5, 3600), default=60.0,
        help="Seconds without a heartbeat after which the supervisor kills and replaces a worker.")
@option("--delete-linger", type=click.FloatRange(0, 10), default=0.05,
        help="Seconds an acknowledged message may wait for a fuller DeleteMessageBatch.")
@option("--stats-interval", type=click.FloatRange(0.1), default=10.0,
        help="Seconds between throughput log lines.")
@option("--metrics-port", type=click.IntRange(1, 65535), default=None, show_default=False,
        help="Serve Prometheus metrics on this port (/metrics) [default: off].")
@option("--metrics-host", default="127.0.0.1",
        help="Address for --metrics-port (0.0.0.0 to let Prometheus scrape the pod).")
@option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False), default="INFO",
        help="Log level; logs go to stderr.")
@option("--data", "data_mode", type=click.Choice(["message", "body"]), default="message",
        help="Event data: the whole SQS message as JSON, or the raw body.")
@option("--sink", extra_env=["K_SINK"], default=None, show_default=False,
        help="HTTP channel: the sink URL (Knative's K_SINK works too).")
@option("--http-mode", type=click.Choice(["binary", "structured"]), default="binary",
        help="HTTP channel: CloudEvents content mode.")
@option("--http-concurrency", type=click.IntRange(1, 1024), default=64,
        help="HTTP channel: requests in flight per process at most, each on a keep-alive connection.")
@option("--http-timeout", type=click.FloatRange(0.001, 3600), default=30.0,
        help="HTTP channel: seconds per request, all of it (connect, send, the full answer).")
@option("--kafka-bootstrap-servers", default=None, show_default=False,
        help="Kafka channel: host:port[,host:port...].")
@option("--kafka-topic", default=None, show_default=False, help="Kafka channel: the topic.")
@option("--kafka-config", type=_Lines(), multiple=True, metavar="KEY=VALUE", show_default=False,
        help="Kafka channel: librdkafka setting, repeatable (env: one KEY=VALUE per line).")
@option("--kafka-format", type=click.Choice(["binary", "structured", "raw"]), default="binary",
        help="Kafka channel: CloudEvents binary or structured mode, or the raw body.")
@option("--kafka-timestamp", type=click.Choice(["now", "sent"]), default="now",
        help="Kafka channel: record timestamp: the produce time, or the message's SentTimestamp "
             "(older than the topic's retention.ms, such records can be deleted at once).")
@option("--kafka-key", default="group",
        help="Kafka channel: record key: group (FIFO MessageGroupId), attribute:NAME, or none.")
@option("--kafka-auth", type=click.Choice(["none", "tls", "scram-sha-512", "iam"]), default="none",
        help="Kafka channel: authentication (iam needs the poller[msk] extra).")
@option("--kafka-create-topic", is_flag=True, default=False,
        help="Kafka channel: create the topic if it is missing.")
@option("--kafka-partitions", type=click.IntRange(1, 100_000), default=3,
        help="Kafka channel: partitions of a created topic.")
@option("--kafka-replication", type=click.IntRange(1, 100), default=1,
        help="Kafka channel: replication factor of a created topic.")
def run(**opts: Any) -> int:
    """Poll one SQS queue and publish every message to the channel.

    Runs --processes worker processes under a supervisor that restarts any that dies. Each
    message is deleted from SQS only after the channel acknowledged it; a failed delivery is
    retried after a backoff, a rejected one is left to the queue's redrive policy (DLQ).
    """
    setup_logging(opts["log_level"].upper())
    check_url(opts["queue_url"], "queue")
    channel = _channel_config(opts)
    target = _resolve(opts)
    attributes = _check_queue(target)
    fifo = attributes.get("FifoQueue") == "true"
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
            nack_backoff_base=opts["nack_backoff"],
            nack_backoff_max=opts["nack_backoff_max"],
            retries=opts["retries"],
            max_processing_time=opts["max_processing_time"],
            max_rate=opts["max_rate"] / opts["processes"],
            shutdown_timeout=opts["shutdown_timeout"],
            log_level=opts["log_level"].upper(),
        )
        config = RunConfig(worker=worker, processes=opts["processes"],
                           shutdown_timeout=opts["shutdown_timeout"],
                           stats_interval=opts["stats_interval"],
                           worker_timeout=opts["worker_timeout"])
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    _check_channel(channel, target.queue_url)
    from poller.supervisor import Supervisor  # imported late: keeps --help fast

    supervisor = Supervisor(config)
    if opts["metrics_port"] is not None:
        try:
            supervisor.serve_metrics(opts["metrics_host"], opts["metrics_port"])
        except OSError as exc:
            raise BootError(f"cannot serve metrics on {opts['metrics_host']}:{opts['metrics_port']}: "
                            f"{exc.strerror or exc}") from None
    # Logging starts only here, once every start check passed: a bad start stays one line.
    if "RedrivePolicy" not in attributes:
        log.warning("queue has no redrive policy: rejected messages will be redelivered until "
                    "they expire (retention %ss)", attributes.get("MessageRetentionPeriod", "?"))
    log.info("polling %s%s (region %s, endpoint %s) -> %s channel %s with %d process(es)",
             target.queue_url, " (FIFO)" if fifo else "", target.region, target.endpoint_url,
             channel.name, _describe(channel), config.processes)
    return supervisor.run()


def _channel_config(opts: dict[str, Any]) -> ChannelConfig:
    try:
        overrides = parse_overrides(os.environ.get("K_CE_OVERRIDES"))
        if opts["channel_name"] == "http":
            if not opts["sink"]:
                raise click.UsageError("the http channel needs a sink: pass --sink URL or set K_SINK")
            return HttpConfig(
                sink=opts["sink"], mode=opts["http_mode"], data_mode=opts["data_mode"],
                overrides=overrides, concurrency=opts["http_concurrency"],
                timeout=opts["http_timeout"],
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
            region=opts["region"],
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
    """GetQueueAttributes once before any worker starts: a clear error beats N crashing workers."""
    try:
        client = BlockingSqsClient(target)
    except ValueError as exc:
        raise BootError(str(exc)) from None
    try:
        return client.queue_attributes()
    except SqsError as exc:
        if exc.code in ("QueueDoesNotExist", "AWS.SimpleQueueService.NonExistentQueue"):
            raise BootError(f"queue {target.queue_url} does not exist (region {target.region}, "
                            f"endpoint {target.endpoint_url})") from None
        if exc.code in CREDENTIAL_CODES:
            raise BootError(f"AWS rejected the credentials: {exc}") from None
        if exc.code in ("ConnectionError", "Timeout"):
            raise BootError(f"cannot reach SQS at {target.endpoint_url}: {exc}") from None
        raise BootError(f"cannot read the queue's attributes: {exc}") from None
    finally:
        client.close()


def _check_channel(config: ChannelConfig, source: str) -> None:
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
    setup_logging("INFO")
    if endpoint_url:
        check_url(endpoint_url, "endpoint")
    from poller.demo import DemoOptions, run_demo

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
    from channels.inmemory import serve_channel

    try:
        serve_channel(port, list(subscribers), host=host)
    except (OSError, ValueError, RuntimeError) as exc:  # port taken, bad address, server died
        raise click.ClickException(f"in-memory channel: {exc}") from None
    return 0


@cli.command("dump")
@click.option("--port", type=click.IntRange(0, 65535), default=8081, show_default=True,
              help="Port to listen on (127.0.0.1 unless --host).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--pretty", is_flag=True, help="Indented JSON instead of one line per event.")
def dump_cmd(port: int, host: str, pretty: bool) -> int:
    """The message dumper: prints every CloudEvent it receives and answers 2xx."""
    setup_logging("INFO")
    from channels.dumper import serve_dumper

    try:
        serve_dumper(port, pretty, host=host)
    except (OSError, ValueError, RuntimeError) as exc:
        raise click.ClickException(f"message dumper: {exc}") from None
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
