"""``--profile``: one poller worker in-process, SQS -> HTTP sink, under cProfile; where the CPU goes.

The one place the benchmarks import poller internals (``Worker``, ``WorkerConfig``): it profiles
the worker, not the CLI, so it follows the worker's API (today: ``async Worker.run`` on a uvloop
event loop, run here in a thread of its own). Every thread started meanwhile (the loop's, and any
executor thread) gets its own ``cProfile.Profile`` timed with ``time.thread_time`` (that thread's
CPU time, so time blocked in ``epoll`` or on a lock is not counted), and the profiles are merged.
With an event loop, coroutines' cumulative times count each resume separately: read the own
times and the callbacks' rows. Profiling slows Python
code down (every call is timed), so read the shares, not the absolute numbers; the benchmark
proper gives the real CPU per message.
"""

from __future__ import annotations

import asyncio
import cProfile
import io
import logging
import os
import pstats
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import uvloop

from benchmarks.peers import Sink
from benchmarks.procstat import thread_cpu_seconds
from benchmarks.sqs import (
    REGION,
    VISIBILITY_TIMEOUT,
    create_queue,
    preload,
    queue_total,
)
from channels.http import HttpConfig
from poller.config import WorkerConfig
from poller.sqs import SqsTarget
from poller.worker import Worker

__all__ = ["HOT_PATH", "profile_http_worker"]

log = logging.getLogger(__name__)

# (label, file suffix, function name; for C functions "~" and a part of the name): cumulative
# CPU of these per message answers "where does it go". Indented rows are part of the row above.
HOT_PATH: tuple[tuple[str, str, str], ...] = (
    ("receive loop, per resume (Receiver.run)", "poller/receiver.py", "run"),
    ("  hand-over to the channel (Dispatcher.hand_over)", "poller/dispatcher.py", "hand_over"),
    ("HTTP channel publish (HttpChannel.publish)", "channels/http.py", "publish"),
    ("  event head (EventFormat.http_binary_head)", "channels/events.py", "http_binary_head"),
    ("    time attribute (rfc3339_from_millis)", "channels/events.py", "rfc3339_from_millis"),
    ("  request bytes (RequestTemplate.build)", "channels/transport/http.py", "build"),
    ("answers read and parsed (_Connection.data_received)", "channels/transport/http.py", "data_received"),
    ("  sink answer handling (HttpChannel._answered)", "channels/http.py", "_answered"),
    ("outcome bookkeeping (Dispatcher._on_report)", "poller/dispatcher.py", "_on_report"),
    ("  the decision (Dispatcher._settle)", "poller/dispatcher.py", "_settle"),
    ("deletes queued (Deleter.add)", "poller/deleter.py", "add"),
    ("SigV4 signing (SigV4Signer.headers)", "poller/sqs.py", "headers"),
    ("orjson.loads (SQS answers)", "~", "orjson.loads"),
    ("orjson.dumps (events and SQS requests)", "~", "orjson.dumps"),
    ("transport writes (uvloop)", "~", "'write' of 'uvloop"),
    ("counters (Counters.add)", "poller/stats.py", "add"),
)


@contextmanager
def profile_threads(profiles: list[cProfile.Profile]) -> Iterator[None]:
    """Profile every thread started inside the block with its own per-thread-CPU profiler."""
    original = threading.Thread.run
    lock = threading.Lock()

    def run(self: threading.Thread) -> None:
        profiler = cProfile.Profile(time.thread_time)
        with lock:
            profiles.append(profiler)
        profiler.enable()
        try:
            original(self)
        finally:
            profiler.disable()

    threading.Thread.run = run  # type: ignore[method-assign]
    try:
        yield
    finally:
        threading.Thread.run = original  # type: ignore[method-assign]


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def thread_cpu() -> dict[str, float]:
    """CPU seconds of this process's live Python threads, by name without its ``-N`` suffix."""
    groups: dict[str, float] = {}
    for thread in threading.enumerate():
        tid = thread.native_id
        if tid is None:
            continue
        seconds = thread_cpu_seconds(tid)
        if seconds is None:
            continue
        name = thread.name.rsplit("-", 1)[0] if thread.name[-1:].isdigit() else thread.name
        groups[name] = groups.get(name, 0.0) + seconds
    return groups


@dataclass(slots=True)
class WorkerRun:
    messages: int
    seconds: float
    cpu_seconds: float
    threads: dict[str, float]


def run_worker(sqs: Any, endpoint: str, sink: Sink, bodies: Sequence[str],
               profiles: list[cProfile.Profile] | None) -> WorkerRun:
    """One in-process worker drains a freshly pre-loaded queue into the sink.

    With ``profiles``, every thread it starts is profiled (into that list).
    """
    url = create_queue(sqs, "profile")
    preload(sqs, url, bodies, label="profile")
    sink.reset()
    config = WorkerConfig(
        target=SqsTarget(queue_url=url, region=REGION, endpoint_url=endpoint),
        channel=HttpConfig(sink=sink.url), queue_visibility_timeout=VISIBILITY_TIMEOUT,
    )
    worker = Worker(config)
    expected = len(bodies)
    loops: list[asyncio.AbstractEventLoop] = []

    def run_loop() -> None:
        async def main() -> None:
            loops.append(asyncio.get_running_loop())
            await worker.run()
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main())

    with profile_threads(profiles) if profiles is not None else nullcontext():
        # The patch stays on until the worker is done: it starts its threads inside run().
        runner = threading.Thread(target=run_loop, name="worker-loop")
        began, began_cpu = time.monotonic(), _cpu()
        runner.start()
        deadline = began + 60 + expected / 50
        while not (sink.stats()["unique"] >= expected and queue_total(sqs, url) == 0):
            if time.monotonic() > deadline or not runner.is_alive():
                raise RuntimeError(f"the in-process worker did not drain the queue (sink: {sink.stats()})")
            time.sleep(0.05)
        seconds, cpu = time.monotonic() - began, _cpu() - began_cpu
        threads = thread_cpu()  # before stop(): the worker's threads are still alive
        if loops:
            loops[0].call_soon_threadsafe(worker.stop)  # stop() belongs on the loop
        runner.join(60)
    threads.pop("MainThread", None)
    return WorkerRun(messages=expected, seconds=seconds, cpu_seconds=cpu, threads=threads)


def profile_http_worker(sqs: Any, endpoint: str, sink: Sink, bodies: Sequence[str], *, top: int = 25) -> None:
    """Two in-process runs: plain (real CPU per thread group), then under cProfile (per function)."""
    plain = run_worker(sqs, endpoint, sink, bodies, None)
    log.info("plain worker: %d messages in %.1f s, %.1f us CPU/msg (process)",
             plain.messages, plain.seconds, plain.cpu_seconds / plain.messages * 1e6)
    profiles: list[cProfile.Profile] = []
    profiled = run_worker(sqs, endpoint, sink, bodies, profiles)
    log.info("profiled worker: %d messages in %.1f s, %.1f us CPU/msg under the profiler",
             profiled.messages, profiled.seconds, profiled.cpu_seconds / profiled.messages * 1e6)
    print(thread_report(plain) + "\n" + report(_merge(profiles), profiled.messages, top))  # this mode's result


def thread_report(run: WorkerRun) -> str:
    per_msg = 1e6 / run.messages
    lines = [f"Real CPU of one in-process worker (no profiler), SQS -> HTTP, {run.messages} messages, "
             f"{run.messages / run.seconds:,.0f} msg/s: {run.cpu_seconds * per_msg:.0f} us/msg for the "
             "whole process (incl. the benchmark's polling)", "",
             f"{'thread group':<28} {'us/msg':>8} {'share':>6}"]
    total = sum(run.threads.values()) or 1.0
    for name, seconds in sorted(run.threads.items(), key=lambda kv: -kv[1]):
        lines.append(f"{name:<28} {seconds * per_msg:>8.1f} {seconds / total * 100:>5.0f}%")
    return "\n".join(lines) + "\n"


def _merge(profiles: Sequence[cProfile.Profile]) -> pstats.Stats:
    merged: pstats.Stats | None = None
    for profiler in profiles:
        profiler.create_stats()
        if not getattr(profiler, "stats", None):
            continue
        if merged is None:
            merged = pstats.Stats(profiler)
        else:
            merged.add(profiler)
    if merged is None:
        raise RuntimeError("no thread was profiled")
    return merged


def hot_path(stats: pstats.Stats, messages: int) -> list[tuple[str, float, float]]:
    """(label, own us/msg, cumulative us/msg) for each ``HOT_PATH`` row found."""
    table: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    rows = []
    for label, suffix, name in HOT_PATH:
        own = cum = 0.0
        for (filename, _line, funcname), (_cc, _nc, tt, ct, _callers) in table.items():
            builtin = suffix == "~" and filename == "~" and name in funcname
            if builtin or (funcname == name and filename.endswith(suffix)):
                own += tt
                cum += ct
        rows.append((label, own / messages * 1e6, cum / messages * 1e6))
    return rows


def report(stats: pstats.Stats, messages: int, top: int) -> str:
    total = stats.total_tt  # type: ignore[attr-defined]
    out = io.StringIO()
    out.write(f"Profile of one worker, SQS -> HTTP, {messages} messages: "
              f"{total:.2f} s of thread CPU under cProfile = {total / messages * 1e6:.0f} us/msg "
              "(inflated by the profiler; compare shares)\n\n")
    out.write(f"{'hot path (cumulative CPU per message)':<55} {'cum us/msg':>10} {'share':>6}\n")
    for label, _own, cum in hot_path(stats, messages):
        out.write(f"{label:<55} {cum:>10.1f} {cum / (total / messages * 1e6) * 100:>5.0f}%\n")
    for key, title in (("tottime", "own time"), ("cumulative", "cumulative time")):
        buffer = io.StringIO()
        stats.stream = buffer  # type: ignore[attr-defined]
        stats.sort_stats(key).print_stats(top)
        body = buffer.getvalue()
        body = body[body.find("   ncalls"):] if "   ncalls" in body else body
        out.write(f"\n=== top {top} functions by {title} ===\n{body}")
    return out.getvalue()
