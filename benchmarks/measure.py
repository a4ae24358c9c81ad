"""The measured window of a throughput case, the same for every contender.

1. the contender starts on the *empty* queue and boots (imports, clients, connections; for the
   poller its workers pass /healthz) and sits in its long polls for ``settle`` seconds;
2. its whole process group is frozen (SIGSTOP) and the CPU of its tree read: start-up, not counted;
3. the queue is pre-loaded (the frozen contender spends nothing; SQS may hand the first
   messages to its pending long polls, which it reads once thawed);
4. SIGCONT starts the clock. The window ends when every message arrived (the sink saw every
   distinct message) and the queue is empty (visible + in flight + delayed = 0: every message
   deleted, so acknowledged); a case without a sink ends on the empty queue alone;
5. the tree's CPU is read again before SIGTERM; the difference is the contender's CPU for the
   N messages. Peers' CPU (LocalStack, sink, tansu, proxy) over the same window is kept apart.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import procstat
from benchmarks.contender import ContenderProcess, ContenderSpec, worker_pids
from benchmarks.peers import Sink
from benchmarks.progress import bar
from benchmarks.sqs import preload, queue_total

__all__ = ["Window", "drain_window", "queue_progress", "sink_progress"]

log = logging.getLogger(__name__)

POLL_S = 0.05
STALL_S = 60.0  # no new message delivered for this long: the contender hangs, the case fails
# (delivered so far, complete?)
Progress = Callable[[], tuple[int, bool]]


@dataclass(frozen=True, slots=True)
class Window:
    seconds: float
    cpu_seconds: float
    startup_cpu_seconds: float
    processes: int                    # processes in the tree at the end of the window
    workers: int                      # of which multiprocessing workers (the poller's), at the end
    workers_seen: tuple[int, int] = (0, 0)  # fewest and most workers alive during the window
    peer_cpu_seconds: Mapping[str, float] = field(default_factory=dict)
    exit_code: int | None = None
    notes: tuple[str, ...] = ()

    def details(self) -> dict[str, Any]:
        return {"startup_cpu_seconds": round(self.startup_cpu_seconds, 3), "processes": self.processes,
                "workers": self.workers,
                "workers_seen": list(self.workers_seen), "exit_code": self.exit_code, "notes": list(self.notes)}


def sink_progress(sink: Sink, sqs: Any, queue_url: str, expected: int) -> Progress:
    def progress() -> tuple[int, bool]:
        delivered = sink.unique()
        return delivered, delivered >= expected and queue_total(sqs, queue_url) == 0
    return progress


def queue_progress(sqs: Any, queue_url: str, expected: int) -> Progress:
    def progress() -> tuple[int, bool]:
        left = queue_total(sqs, queue_url)
        return expected - left, left == 0
    return progress


def drain_window(spec: ContenderSpec, *, sqs: Any, queue_url: str, bodies: list[str], progress: Progress,
                 peers: Mapping[str, int], log_dir: Path, timeout: float, settle: float = 1.0,
                 ready_timeout: float = 90.0) -> Window:
    with ContenderProcess(spec, log_dir) as proc:
        try:
            proc.wait_ready(ready_timeout)
            time.sleep(settle)
            proc.freeze()
            before = proc.cpu()
            preload(sqs, queue_url, bodies, label=spec.label)
            peers_before = {name: procstat.total_cpu(pid) for name, pid in peers.items()}
            began = time.monotonic()
            proc.thaw()
            workers_seen = _wait(proc, progress, len(bodies), timeout, spec.label)
            seconds = time.monotonic() - began
            after = proc.cpu()
            workers = len(worker_pids(proc.pid))
            peer_cpu = {name: procstat.total_cpu(pid) - peers_before[name] for name, pid in peers.items()}
        except BaseException:
            log.error("%s failed; its log: %s", spec.label, proc.log_path)
            raise
        code = proc.stop()
    notes = []
    gone = set(before) - set(after)
    if gone:  # a process that ended inside the window took its CPU with it
        notes.append(f"{len(gone)} process(es) of the tree ended inside the window (their CPU is missing)")
    if code not in (0, None):
        notes.append(f"exit code {code}")
    return Window(
        seconds=seconds, cpu_seconds=sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items()),
        startup_cpu_seconds=sum(before.values()), processes=len(after), workers=workers, workers_seen=workers_seen,
        peer_cpu_seconds=peer_cpu, exit_code=code, notes=tuple(notes),
    )


def _wait(proc: ContenderProcess, progress: Progress, expected: int, timeout: float, label: str) -> tuple[int, int]:
    """Until ``progress`` says complete; returns the fewest and most worker processes seen meanwhile
    (a poller whose workers follow the load changes their number inside the window)."""
    deadline = time.monotonic() + timeout
    shown = 0
    moved = time.monotonic()
    fewest, most = 1 << 30, 0
    with bar(total=expected, desc=label) as progress_bar:
        while True:
            workers = len(worker_pids(proc.pid))
            fewest, most = min(fewest, workers), max(most, workers)
            delivered, complete = progress()
            if delivered > shown:
                progress_bar.update(min(delivered, expected) - shown)
                shown = min(delivered, expected)
                moved = time.monotonic()
            if complete:
                return (fewest, most)
            if not proc.alive():
                raise RuntimeError(f"{label} exited with code {proc.proc.returncode} after {delivered} of "
                                   f"{expected}; log tail:\n{proc.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{label}: {delivered} of {expected} delivered after {timeout:.0f} s")
            if time.monotonic() - moved > STALL_S:
                raise TimeoutError(f"{label}: stuck at {delivered} of {expected} for {STALL_S:.0f} s")
            time.sleep(POLL_S)
