"""The ``poller`` command: ``run``, ``check``, ``demo``, ``channel``, ``dump``.

The options of ``run`` and ``check`` are declared once, in ``poller.options`` and with each
installed channel (``channels.registry``); each has an environment variable (``POLLER_<FLAG>``).
AWS settings come the AWS way (default credential chain, ``AWS_REGION``, ``AWS_ENDPOINT_URL_SQS``).
Bad input ends in one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import click
import cloup
import orjson

from channels.http import check_url
from channels.registry import DISTRIBUTION
from poller.boot import BootError, check_channel, describe_channel, make_plan
from poller.exits import EXIT_INTERRUPTED, EXIT_USAGE
from poller.logs import Redactor, setup_logging
from poller.options import apply, installed_channels, run_options

__all__ = ["main"]

log = logging.getLogger("poller")

# The installed channels (entry points "sqs_poller.channels"): their options are flags of `run`
# and `check`, so they are found when the commands are made.
CHANNELS = installed_channels()


# cloup: click with option groups, so `run --help` lists its flags in sections.
@cloup.group(invoke_without_command=True,
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
@apply(run_options(CHANNELS))
def run(**opts: Any) -> int:
    """Poll one SQS queue and publish every message to the channel.

    Runs --processes worker processes under a supervisor that restarts any that dies. Each
    message is deleted from SQS only after the channel acknowledged it; a failed delivery is
    retried in place, a rejected one is left to the queue's redrive policy (DLQ).
    """
    plan = make_plan(opts, CHANNELS)
    check_channel(plan)
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
    detail = describe_channel(plan)
    log.info("polling %s%s (region %s, endpoint %s) -> %s channel%s with %s process(es)",
             plan.target.queue_url, " (FIFO)" if fifo else "", plan.target.region, plan.target.endpoint_url,
             plan.channel.name, f" {detail}" if detail else "", plan.config.processes_text)
    return supervisor.run()


# -- check -----------------------------------------------------------------------------------


CHECK_EPILOG = """Exit 0 when everything answered; the first failure is one line and exit 3.

It takes every flag and environment variable of `poller run`, so a run's command line can be
checked as it is; those it does not use are not listed here.
"""


@cli.command(epilog=CHECK_EPILOG)
@apply(run_options(CHANNELS), for_check=True)
def check(**opts: Any) -> int:
    """Check what `poller run` would use, with the same flags, and print a short report.

    Credentials, the queue (visibility timeout, redrive policy and DLQ, FIFO, depth), the
    permissions to delete and to change visibility (a call with a made-up receipt handle), and
    the channel's sink (HTTP: an OPTIONS request; Kafka: the broker and the topic). Warns when
    the visibility timeout is shorter than a delivery may take, and when there is no DLQ.
    """
    from poller.check import run_check

    return run_check(make_plan(opts, CHANNELS))


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
        _error(exc.format_message(), argv)
        return exc.exit_code
    except click.Abort:
        _error("interrupted", argv, prefix="poller: ")
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except ValueError as exc:  # a config check that escaped: still one line
        _error(str(exc), argv)
        return EXIT_USAGE
    return result if isinstance(result, int) else 0


def _error(message: str, argv: Sequence[str] | None, prefix: str = "poller: error: ") -> None:
    """A start-up error's one line, as ``--log-format`` asks: with ``json``, one JSON object as
    every other log line (the flag is read from the arguments or ``POLLER_LOG_FORMAT``, since a
    usage error may come before click has parsed it)."""
    if _log_format(sys.argv[1:] if argv is None else argv) != "json":
        click.echo(prefix + message, err=True)
        return
    now = time.time()
    doc = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z",
           "level": "ERROR", "process": "MainProcess", "logger": "poller",
           "message": Redactor.from_environment()(message)}
    click.echo(orjson.dumps(doc).decode(), err=True)


def _log_format(argv: Sequence[str]) -> str:
    value = os.environ.get("POLLER_LOG_FORMAT", "text")
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg == "--log-format" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--log-format="):
            value = arg.partition("=")[2]
    return value


if __name__ == "__main__":
    sys.exit(main())
