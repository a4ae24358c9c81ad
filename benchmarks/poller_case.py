"""One measured run of the real ``poller run`` (supervisor + spawned workers) against a queue.

How the window is cut, so that neither start-up nor sending is counted:

1. the poller starts on the *empty* queue and its workers boot (imports, connections);
2. the whole process group is frozen with SIGSTOP, and its CPU so far is read (start-up);
3. the queue is pre-loaded (the frozen poller uses no CPU meanwhile; SQS may hand the first
   messages to its pending long polls, which it reads once thawed);
4. SIGCONT starts the clock; the case ends when the queue is empty (every message deleted, so
   acknowledged by the channel) and, for HTTP, the sink has every event;
5. the CPU of the supervisor and of every worker (utime + stime from ``/proc/<pid>/stat``) is
   read again just before SIGTERM. The difference is the poller's CPU for the N messages.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import procstat
from benchmarks.peers import load_test_module, preload, queue_total

__all__ = ["PollerRun", "run_poller_case"]

log = logging.getLogger(__name__)

_STOPPED_LINE = re.compile(r"stopped\. received ([\d,]+) acked ([\d,]+) deleted ([\d,]+)")


@dataclass(slots=True)
class PollerRun:
    messages: int
    seconds: float
    cpu_seconds: float               # supervisor + workers, inside the window
    startup_cpu_seconds: float       # before the window (boot), for context
    supervisor_cpu_seconds: float
    worker_cpu_seconds: list[float]
    peer_cpu_seconds: dict[str, float] = field(default_factory=dict)  # localstack, sink, tansu
    acked: int | None = None
    deleted: int | None = None
    exit_code: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _worker_pids(supervisor: int) -> list[int]:
    return [p for p in procstat.children(supervisor) if "spawn_main" in procstat.cmdline(p)]


def _group_pids(supervisor: int) -> list[int]:
    return [supervisor, *procstat.descendants(supervisor)]


def _signal_group(pid: int, signum: signal.Signals) -> None:
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        pass


def _freeze(pid: int) -> None:
    _signal_group(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while not all(procstat.is_stopped(p) for p in _group_pids(pid)):
        if time.monotonic() > deadline:
            raise RuntimeError("the poller did not stop on SIGSTOP")
        time.sleep(0.01)


def run_poller_case(
    *,
    label: str,
    args: Sequence[str],
    env: dict[str, str],
    processes: int,
    sqs: Any,
    queue_url: str,
    bodies: Sequence[str],
    peers: dict[str, int],
    log_dir: Path,
    done: Callable[[], bool],
    timeout: float,
) -> PollerRun:
    """``done()`` is polled (besides the queue being empty) to end the window."""
    poller_proc = load_test_module("support")
    poller = poller_proc.PollerProcess(args, env, log_dir / f"poller-{label}.log")
    try:
        return _measure(poller, processes, sqs, queue_url, bodies, peers, done, timeout)
    except BaseException:
        poller.kill()
        log.error("poller log tail (%s):\n%s", poller.log_path, "\n".join(poller.log_text().splitlines()[-20:]))
        raise


def _measure(poller: Any, processes: int, sqs: Any, queue_url: str, bodies: Sequence[str],
             peers: dict[str, int], done: Callable[[], bool], timeout: float) -> PollerRun:
    poller.wait_for_workers(processes, timeout=60)
    time.sleep(0.5)  # let the receivers settle into their long polls
    _freeze(poller.pid)
    pids = _group_pids(poller.pid)
    startup = procstat.process_cpu(pids)
    preload(sqs, queue_url, bodies)
    peers_before = {name: procstat.total_cpu(pid) for name, pid in peers.items()}
    began = time.monotonic()
    _signal_group(poller.pid, signal.SIGCONT)
    deadline = began + timeout
    while not (done() and queue_total(sqs, queue_url) == 0):
        if time.monotonic() > deadline:
            raise TimeoutError(f"not drained after {timeout:.0f} s (queue holds {queue_total(sqs, queue_url)})")
        if poller.proc.poll() is not None:
            raise RuntimeError(f"the poller exited early with code {poller.proc.returncode}")
        time.sleep(0.05)
    seconds = time.monotonic() - began
    end = procstat.process_cpu(_group_pids(poller.pid))
    peer_cpu = {name: procstat.total_cpu(pid) - peers_before[name] for name, pid in peers.items()}
    workers = _worker_pids(poller.pid)
    code = poller.stop(timeout=40)
    delta = {pid: end.get(pid, 0.0) - startup.get(pid, 0.0) for pid in end}
    run = PollerRun(
        messages=len(bodies), seconds=seconds, cpu_seconds=sum(delta.values()),
        startup_cpu_seconds=sum(startup.values()),
        supervisor_cpu_seconds=delta.get(poller.pid, 0.0),
        worker_cpu_seconds=[delta.get(pid, 0.0) for pid in workers],
        peer_cpu_seconds=peer_cpu, exit_code=code,
    )
    match = None
    for match in _STOPPED_LINE.finditer(poller.log_text()):
        pass
    if match is not None:
        run.acked, run.deleted = (int(g.replace(",", "")) for g in match.groups()[1:])
    return run
