"""``poller check``: what ``poller run`` would use, checked and reported in a few lines.

The flags and the queue were checked already (``cli._plan``: credentials are proven by the
queue's ``GetQueueAttributes``, the permissions to delete and to change visibility by a call
with a made-up receipt handle each); this reports them and the queue and checks the channel:
the sink answers an ``OPTIONS`` request (any HTTP status proves it is there), or the broker and
the topic. The first failure is one line and exit 3, as a failed start of ``run``; warnings do
not fail.
"""

from __future__ import annotations

import http.client
import ssl
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import click
import orjson

from channels.http import HttpConfig, basic_auth, redact
from poller.sqs import PERMISSION_PROBES

if TYPE_CHECKING:
    from poller.cli import Plan

__all__ = ["run_check"]

EXIT_FAILED = 3


def run_check(plan: Plan, opts: dict[str, Any]) -> int:
    out = _Report()
    attributes = plan.attributes
    out.ok("credentials", f"SQS accepted them (region {plan.target.region}, endpoint {plan.target.endpoint_url})")
    visibility = int(attributes.get("VisibilityTimeout", 30))
    fifo = attributes.get("FifoQueue") == "true"
    out.ok("queue", f"{plan.target.queue_url}{' (FIFO)' if fifo else ''}")
    out.line(f"visibility timeout {visibility} s, retention {attributes.get('MessageRetentionPeriod', '?')} s, "
             f"about {attributes.get('ApproximateNumberOfMessages', '?')} visible, "
             f"{attributes.get('ApproximateNumberOfMessagesNotVisible', '?')} in flight, "
             f"{attributes.get('ApproximateNumberOfMessagesDelayed', '?')} delayed")
    out.ok("permission", "sqs:GetQueueAttributes (the queue's attributes were read)")
    for probe in PERMISSION_PROBES:  # cli._plan checked each: a denial failed it in one line
        out.ok("permission", f"{probe.permission} (a {probe.action} of a made-up receipt handle got "
                             "past authorization)")
    out.line("sqs:ReceiveMessage is not checked: a receive that is allowed takes a message")
    redrive = _redrive(attributes.get("RedrivePolicy"))
    if redrive:
        out.line(f"redrive policy: to {redrive[0]} after {redrive[1]} receives")
    else:
        out.warn("the queue has no redrive policy (DLQ): a message the sink rejects comes back until "
                 "its retention ends")
    worker = plan.config.worker
    effective = worker.effective_visibility_timeout
    if isinstance(plan.channel, HttpConfig):
        longest = plan.channel.timeout * worker.retries
        if effective < longest:
            out.warn(f"visibility timeout {effective} s is shorter than --http-timeout {plan.channel.timeout:g} s "
                     f"x --retries {worker.retries} = {longest:g} s: a slow sink keeps messages invisible only "
                     "through extensions (ChangeMessageVisibility calls); a longer timeout needs fewer")
        status = _check_sink(plan.channel)
        out.ok("sink", f"{redact(plan.channel.sink)} answered OPTIONS with HTTP {status}")
    else:
        from poller.cli import check_channel
        check_channel(plan.channel, plan.target.queue_url)
        out.ok("kafka", f"{opts['kafka_bootstrap_servers']} answered; topic {opts['kafka_topic']!r} exists")
    click.echo(out.text())
    return 0


class _Report:
    def __init__(self) -> None:
        self._lines: list[str] = []

    def ok(self, what: str, detail: str) -> None:
        self._lines.append(f"ok       {what}: {detail}")

    def line(self, detail: str) -> None:
        self._lines.append(f"         {detail}")

    def warn(self, detail: str) -> None:
        self._lines.append(f"warning  {detail}")

    def text(self) -> str:
        return "\n".join(self._lines)


def _redrive(policy: str | None) -> tuple[str, str] | None:
    if not policy:
        return None
    try:
        doc = orjson.loads(policy)
        return str(doc["deadLetterTargetArn"]), str(doc["maxReceiveCount"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None


def _check_sink(config: HttpConfig) -> int:
    """The sink's status for OPTIONS; BootError (one line) if nothing answers in time."""
    from poller.cli import BootError

    url = urlsplit(config.sink)
    https = url.scheme == "https"
    conn_class = http.client.HTTPSConnection if https else http.client.HTTPConnection
    kwargs: dict[str, Any] = {"timeout": min(config.timeout, 10.0)}
    if https:
        kwargs["context"] = ssl.create_default_context()
    conn = conn_class(url.hostname or "", url.port, **kwargs)
    headers = {"User-Agent": "sqs-poller check"}
    auth = basic_auth(config.sink)
    if auth:
        headers["Authorization"] = auth
    try:
        conn.request("OPTIONS", (url.path or "/") + (f"?{url.query}" if url.query else ""), headers=headers)
        return conn.getresponse().status
    except (OSError, http.client.HTTPException) as exc:
        raise BootError(f"sink {redact(config.sink)} does not answer: {type(exc).__name__}: {exc}") from None
    finally:
        conn.close()
