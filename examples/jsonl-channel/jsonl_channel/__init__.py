"""The jsonl channel: every message, as a structured CloudEvent, appended to a file, one JSON
document per line; acknowledged once the line is written and flushed (``--jsonl-fsync``: and on
disk).

One writer thread takes the batches in publish order, so the channel ``keeps_order``.
``publish`` only queues (it runs on the worker's event loop and must not block).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO, ClassVar

from channels.base import Channel, ChannelError, Message, Outcome, Report
from channels.events import EventError, EventFormat
from channels.options import Option
from channels.plugin import BuildContext, ChannelPlugin
from channels.reports import LoopReports

__all__ = ["CHANNEL", "JsonlChannel", "JsonlConfig"]

log = logging.getLogger("jsonl_channel")

WRITE_TIMEOUT = 10.0  # seconds one batch's write may take before the channel counts as stalled


@dataclass(frozen=True, slots=True, kw_only=True)
class JsonlConfig:
    name: ClassVar[str] = "jsonl"

    path: str
    fsync: bool = False
    data_mode: str = "message"
    overrides: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("the jsonl channel needs --jsonl-path FILE")
        EventFormat(source="", data_mode=self.data_mode)  # validates data_mode

    @property
    def attempt_timeout(self) -> float:
        return WRITE_TIMEOUT

    def create(self, source: str) -> JsonlChannel:
        return JsonlChannel(self, source)


class JsonlChannel(Channel):
    keeps_order = True

    def __init__(self, config: JsonlConfig, source: str) -> None:
        self._config = config
        self._format = EventFormat(source=source, data_mode=config.data_mode, overrides=dict(config.overrides))
        self._batches: queue.SimpleQueue[list[tuple[Message, bytes]] | None] = queue.SimpleQueue()
        self._pending: dict[int, tuple[Message, Report]] = {}  # id(message): not reported yet
        self._lock = threading.Lock()
        self._busy_since: float | None = None
        self._file: BinaryIO | None = None
        self._writer = threading.Thread(target=self._write_loop, name="jsonl-writer", daemon=True)
        self._reports = LoopReports()  # the writer thread's reports go to the worker's loop

    def start(self) -> None:
        try:
            self._file = open(self._config.path, "ab")  # noqa: SIM115 - closed by the writer
        except OSError as exc:
            raise ChannelError(f"cannot open {self._config.path}: {exc.strerror or exc}") from None
        self._writer.start()

    def publish(self, batch: Sequence[Message], report: Report) -> None:
        self._reports.bind()
        lines = []
        for message in batch:
            try:
                lines.append((message, self._format.structured(message) + b"\n"))
            except EventError as exc:
                report(message, Outcome.REJECT, str(exc))
                continue
            with self._lock:
                self._pending[id(message)] = (message, report)
        if lines:
            self._batches.put(lines)

    def _write_loop(self) -> None:
        assert self._file is not None
        while (lines := self._batches.get()) is not None:
            self._busy_since = time.monotonic()
            try:
                self._file.write(b"".join(line for _, line in lines))
                self._file.flush()
                if self._config.fsync:
                    os.fsync(self._file.fileno())
                outcome, reason = Outcome.ACK, ""
            except OSError as exc:
                outcome, reason = Outcome.RETRY, f"cannot write {self._config.path}: {exc.strerror or exc}"
            self._busy_since = None
            for message, _ in lines:
                self._settle(message, outcome, reason)
        self._file.close()

    def _settle(self, message: Message, outcome: Outcome, reason: str) -> None:
        with self._lock:  # exactly once: close may have reported it RETRY already
            entry = self._pending.pop(id(message), None)
        if entry is not None:
            self._reports.send(entry[1], message, outcome, reason)

    def stalled(self) -> str | None:
        since = self._busy_since
        if since is not None and time.monotonic() - since > WRITE_TIMEOUT:
            return f"writing to {self._config.path} has taken {time.monotonic() - since:.0f} s"
        return None

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued within ``timeout``; what is left is reported RETRY."""
        self._batches.put(None)
        if self._writer.is_alive():
            self._writer.join(timeout)
        with self._lock:
            left = list(self._pending.values())
            self._pending.clear()
        for message, report in left:
            self._reports.send(report, message, Outcome.RETRY, "the channel closed before the line was written")


OPTIONS = (
    Option(flag="--jsonl-path", help="jsonl channel: the file each event is appended to, one JSON line each."),
    Option(flag="--jsonl-fsync", kind=bool,
           help="jsonl channel: fsync after each batch, so an ack survives a crash of the machine."),
)


def _build(context: BuildContext) -> JsonlConfig:
    return JsonlConfig(path=context.values["jsonl_path"] or "", fsync=context.values["jsonl_fsync"],
                       data_mode=context.data_mode, overrides=tuple(context.overrides.items()))


def _describe(config: JsonlConfig) -> str:
    return f"file {config.path}{' (fsync)' if config.fsync else ''}"


CHANNEL = ChannelPlugin(name="jsonl", options=OPTIONS, build=_build, describe=_describe,
                        deadline=f"one batch's write ({WRITE_TIMEOUT:g} s)")
