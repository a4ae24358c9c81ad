"""``poller check``: what ``poller run`` would use, checked and reported in a few lines.

The flags and the queue were checked already (``boot.make_plan``: credentials are proven by the
queue's ``GetQueueAttributes``, the permissions to delete and to change visibility by a call
with a made-up receipt handle each); this reports them and the queue and checks the channel with
its own ``probe`` (``channels.plugin.ChannelPlugin``): the HTTP sink answers an ``OPTIONS``
request (any status proves it is there), the Kafka broker answers and the topic exists; a
channel without a probe is started and closed. The first failure is one line and exit 3, as a
failed start of ``run``; warnings do not fail.
"""

from __future__ import annotations

import click
import orjson

from channels.transport.proxy import route_for
from poller.boot import Plan, probe_channel, region_warning
from poller.sqs import PERMISSION_PROBES

__all__ = ["run_check"]


def run_check(plan: Plan) -> int:
    out = _Report()
    attributes = plan.attributes
    out.ok("credentials", f"SQS accepted them (region {plan.target.region}, endpoint {plan.target.endpoint_url})")
    out.line(f"SQS {route_for(plan.target.endpoint_url)}"
             + (f", trusting the CA bundle {plan.target.ca_bundle}" if plan.target.ca_bundle
                and plan.target.endpoint_url.startswith("https:") else ""))
    mismatch = region_warning(plan.target)
    if mismatch:  # as `run` warns
        out.warn(mismatch)
    visibility = int(attributes.get("VisibilityTimeout", 30))
    fifo = attributes.get("FifoQueue") == "true"
    out.ok("queue", f"{plan.target.queue_url}{' (FIFO)' if fifo else ''}")
    out.line(f"visibility timeout {visibility} s, retention {attributes.get('MessageRetentionPeriod', '?')} s, "
             f"about {attributes.get('ApproximateNumberOfMessages', '?')} visible, "
             f"{attributes.get('ApproximateNumberOfMessagesNotVisible', '?')} in flight, "
             f"{attributes.get('ApproximateNumberOfMessagesDelayed', '?')} delayed")
    out.ok("permission", "sqs:GetQueueAttributes (the queue's attributes were read)")
    for probe in PERMISSION_PROBES:  # boot.make_plan checked each: a denial failed it in one line
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
    attempt = plan.channel.attempt_timeout
    longest = attempt * worker.retries
    if effective < longest:
        out.warn(f"visibility timeout {effective} s is shorter than the {plan.channel.name} channel's deadline "
                 f"for one attempt ({attempt:g} s: {plan.plugin.deadline}) x --retries {worker.retries} = "
                 f"{longest:g} s: a slow sink keeps messages invisible only through extensions "
                 "(ChangeMessageVisibility calls); a longer timeout needs fewer")
    what, detail = probe_channel(plan)
    out.ok(what, detail)
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
