"""``poller demo``: the seed's Knative sample on one machine.

    SQS queue (local) -> poller run -> in-memory channel -> message dumper (prints each event)

It starts a local SQS (an endpoint you gave, Docker, LocalStack on the host, or moto's server, in
that order), creates a queue with a DLQ, starts the channel and the dumper in this process and
``poller run`` as a child process, sends a few sample messages (one a second with ``--follow``)
and shows them arriving. Ctrl-C (or ``--duration``) stops everything it started.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING

import boto3
import orjson

from poller.kit.dumper import DumperServer
from poller.kit.inmemory import InMemoryChannelServer
from poller.kit.localsqs import start_sqs
from poller.kit.process import ServiceError

if TYPE_CHECKING:
    from mypy_boto3_sqs import SQSClient

__all__ = ["DemoOptions", "run_demo"]

log = logging.getLogger("poller.kit.demo")

_LOCAL_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoOptions:
    endpoint_url: str | None = None
    messages: int = 5
    follow: bool = False
    duration: float | None = None  # None: until Ctrl-C
    processes: int = 1


def _interrupt(signum: int, frame: object) -> None:
    """Ctrl-C or SIGTERM: unwind, whatever the demo is doing (even installing LocalStack).

    Installed explicitly, because a shell starting us in the background would leave SIGINT
    ignored. Further signals are ignored so the cleanup itself is not cut short.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def run_demo(options: DemoOptions) -> int:
    previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with ExitStack() as stack:
            try:
                service = stack.enter_context(start_sqs(endpoint=options.endpoint_url))
            except ServiceError as exc:
                log.error("cannot start a local SQS: %s", exc)
                return 1
            log.info("local SQS: %s at %s", service.name, service.endpoint)
            sqs = boto3.client(
                "sqs", endpoint_url=service.endpoint, region_name="us-east-1",
                aws_access_key_id="test", aws_secret_access_key="test",
            )
            queue_url = _create_queue(sqs)
            dumper = stack.enter_context(DumperServer("127.0.0.1", 0))
            channel = stack.enter_context(InMemoryChannelServer("127.0.0.1", 0, [dumper.url]))
            log.info("queue %s -> poller -> channel %s -> dumper %s", queue_url, channel.url, dumper.url)
            poller = _start_poller(queue_url, channel.url, service.endpoint, options.processes)
            stack.callback(_stop_poller, poller)
            _send_samples(sqs, queue_url, options)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        log.info("demo stopped")


def _create_queue(sqs: SQSClient) -> str:
    name = f"poller-demo-{uuid.uuid4().hex[:8]}"
    dlq = sqs.create_queue(QueueName=f"{name}-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(
        QueueUrl=dlq, AttributeNames=["QueueArn"]
    )["Attributes"]["QueueArn"]
    redrive = orjson.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "5"}).decode()
    return sqs.create_queue(
        QueueName=name, Attributes={"RedrivePolicy": redrive, "VisibilityTimeout": "30"}
    )["QueueUrl"]


def _start_poller(queue_url: str, sink: str, endpoint: str, processes: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, **_LOCAL_CREDENTIALS, "AWS_ENDPOINT_URL_SQS": endpoint}
    env.pop("AWS_PROFILE", None)
    env.pop("AWS_SESSION_TOKEN", None)
    argv = [
        sys.executable, "-m", "poller", "run", "--queue-url", queue_url, "--sink", sink,
        "--processes", str(processes), "--wait-time", "5", "--stats-interval", "10",
    ]
    # Its own process group: Ctrl-C reaches the demo, which then stops the poller gracefully.
    return subprocess.Popen(argv, env=env, start_new_session=True)


def _stop_poller(poller: subprocess.Popen[bytes]) -> None:
    if poller.poll() is None:
        poller.send_signal(signal.SIGTERM)
        try:
            poller.wait(35)
        except subprocess.TimeoutExpired:
            poller.kill()
            poller.wait()


def _send_samples(sqs: SQSClient, queue_url: str, options: DemoOptions) -> None:
    started = time.monotonic()
    sent = 0

    def send() -> None:
        nonlocal sent
        sent += 1
        sqs.send_message(
            QueueUrl=queue_url,
            MessageBody=orjson.dumps({"order": sent, "item": "coffee", "sent_at": time.time()}).decode(),
            MessageAttributes={"origin": {"DataType": "String", "StringValue": "poller-demo"}},
        )

    for _ in range(options.messages):
        send()
    log.info("sent %d sample message(s)%s; Ctrl-C stops", sent,
             ", then one a second" if options.follow else "")
    endpoint = sqs.meta.endpoint_url
    log.info("send one of your own: AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test aws sqs send-message "
             "--region us-east-1 --endpoint-url %s --queue-url %s --message-body '{\"hello\": \"world\"}'",
             endpoint, queue_url)
    while options.duration is None or time.monotonic() - started < options.duration:
        time.sleep(1.0)
        if options.follow:
            send()
