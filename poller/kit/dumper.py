"""The message dumper (``poller dump``), also the test suite's HTTP sink.

For each CloudEvent it receives (binary, structured or batched content mode) it writes one JSON line
(indented with ``pretty``) with the event's attributes and its data, then answers 200. ``data``
is the decoded JSON when the content type is JSON, else the text; a body that is not UTF-8 is
shown as ``data_base64``. A request that is not a CloudEvent gets 400 with a one-line reason.
Each line is written under a lock and flushed at once (the demo pipes it).

For tests:

- ``respond(event, headers) -> int | Reply | None`` decides the answer per event (``None``:
  200); it may sleep to play a slow sink. It sees every valid event, including refused ones.
- Only events answered 2xx (what the sink accepted) are printed, kept (``keep=True``: in
  ``received``, raw headers and body included) and passed to ``on_event(event, headers)``, all
  before the answer is sent: when the sender sees the 2xx, the event is already recorded.
- Hook errors are logged, not raised; a failing ``respond`` answers 500.

Keeps nothing across restarts.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

import orjson

from poller.kit.cehttp import (
    CloudEventServer,
    NotACloudEvent,
    Reply,
    ServerOptions,
    Tally,
    batch_reply,
    is_batch,
    parse_batch,
    parse_event,
    run_until_signalled,
)

__all__ = ["DumperCounts", "DumperServer", "EventHook", "Received", "Responder", "serve_dumper"]

log = logging.getLogger(__name__)

Responder = Callable[[dict[str, Any], Mapping[str, str]], "int | Reply | None"]
EventHook = Callable[[dict[str, Any], Mapping[str, str]], None]


@dataclass(frozen=True, slots=True)
class Received:
    """One accepted event: the parsed event, the request's headers (lower-cased), the raw body."""

    event: dict[str, Any]
    headers: Mapping[str, str] = field(repr=False)
    body: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class DumperCounts:
    """``received``: valid events; ``accepted``: answered 2xx; ``refused``: answered otherwise
    (by ``respond`` or an output error); ``invalid``: not CloudEvents (400)."""

    received: int = 0
    accepted: int = 0
    refused: int = 0
    invalid: int = 0


class DumperServer(CloudEventServer):
    """Prints every CloudEvent it receives. Binds in the constructor (``port=0``: a free port).

    ``out`` is where lines go (``None``: ``sys.stdout`` as it is at construction).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        pretty: bool = False,
        out: TextIO | None = None,
        *,
        keep: bool = False,
        on_event: EventHook | None = None,
        respond: Responder | None = None,
        server_options: ServerOptions | None = None,
    ) -> None:
        self.pretty = pretty
        self.out: TextIO = out if out is not None else sys.stdout
        self.keep = keep
        self.on_event = on_event
        self.respond = respond
        self.received: list[Received] = []
        self._received_changed = threading.Condition()
        self._out_lock = threading.Lock()  # one writer at a time: lines never interleave
        self._tally = Tally(DumperCounts())
        self._dump_options = orjson.OPT_INDENT_2 if pretty else 0
        super().__init__(host, port, server_options=server_options)

    @property
    def counts(self) -> DumperCounts:
        return self._tally.value

    @property
    def events(self) -> list[dict[str, Any]]:
        """The kept events (``keep=True``), in arrival order."""
        with self._received_changed:
            return [r.event for r in self.received]

    def wait_for(self, count: int, timeout: float) -> bool:
        """Wait until at least ``count`` events were kept; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._received_changed:
            while len(self.received) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._received_changed.wait(remaining)
        return True

    def handle(self, headers: dict[str, str], body: bytes) -> Reply:
        try:
            events = parse_batch(body) if is_batch(headers) else [(parse_event(headers, body), body)]
        except NotACloudEvent as exc:
            self._tally.add(invalid=1)
            return Reply(400, str(exc))
        replies = [(str(event["id"]), self._handle_event(event, headers, raw)) for event, raw in events]
        return replies[0][1] if not is_batch(headers) else batch_reply(replies)

    def _handle_event(self, event: dict[str, Any], headers: dict[str, str], body: bytes) -> Reply:
        """One event (of a batch, or alone): decided, printed, kept."""
        self._tally.add(received=1)
        reply = self._decide(event, headers)
        if not 200 <= reply.status < 300:
            self._tally.add(refused=1)
            return reply
        try:
            self._write(event)
        except (OSError, ValueError) as exc:  # e.g. the demo's pipe closed
            log.warning("message dumper cannot write event %r: %s", event.get("id"), exc)
            self._tally.add(refused=1)
            return Reply(500, "cannot write the event to the output")
        if self.keep:
            with self._received_changed:
                self.received.append(Received(event, headers, body))
                self._received_changed.notify_all()
        if self.on_event is not None:
            try:
                self.on_event(event, headers)
            except Exception:
                log.exception("message dumper: on_event hook failed for event %r", event.get("id"))
        self._tally.add(accepted=1)
        return reply

    def _decide(self, event: dict[str, Any], headers: Mapping[str, str]) -> Reply:
        if self.respond is None:
            return Reply(200)
        try:
            decided = self.respond(event, headers)
        except Exception:
            log.exception("message dumper: respond hook failed for event %r", event.get("id"))
            return Reply(500, "respond hook failed")
        if decided is None:
            return Reply(200)
        if isinstance(decided, Reply):
            return decided
        return Reply(int(decided), "" if 200 <= int(decided) < 300 else f"answering {int(decided)} as configured")

    def _write(self, event: dict[str, Any]) -> None:
        text = orjson.dumps(event, option=self._dump_options).decode() + "\n"
        with self._out_lock:
            self.out.write(text)
            self.out.flush()


def serve_dumper(port: int, pretty: bool, host: str = "127.0.0.1") -> None:
    """Run the message dumper on stdout until SIGTERM / SIGINT, then stop cleanly (for the CLI).

    Raises ``OSError`` if the port cannot be bound.
    """
    server = DumperServer(host, port, pretty=pretty, out=sys.stdout)

    def stopped() -> str:
        c = server.counts
        return f"message dumper stopped: accepted {c.accepted} events, invalid {c.invalid}"

    run_until_signalled(server, f"message dumper listening on {server.url.rstrip('/')}", stopped)
