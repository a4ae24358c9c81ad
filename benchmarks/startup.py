"""One start-up run: exec a contender on a queue holding one message and time exec -> the first
event at the sink, with the CPU of the contender's whole process tree by then.

- The message is sent first, its body stamped with the wall clock (``keys.body``); the sink
  records arrival - stamp, so the first event's arrival time is the sink's own, not when we
  noticed it: first event = stamp + (arrival - stamp) - exec.
- The tree's CPU is read every ``POLL_S`` until the sink has the event, keeping each process's last
  reading (a process that ended, e.g. a launcher, keeps its figure), and once more when it has.
  That last reading comes at most ~``POLL_S`` plus one sink query after the arrival.
- Then the whole group is killed: nothing more is measured, and a graceful stop would only wait
  for long polls. The queue is the run's own (a killed run's long polls would hide the next run's
  message), deleted afterwards by the caller.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import procstat
from benchmarks.contender import ContenderProcess, ContenderSpec
from benchmarks.keys import body
from benchmarks.peers import Sink
from benchmarks.sqs import send_batch

__all__ = ["FIRST_EVENT_TIMEOUT_S", "StartSample", "first_event"]

POLL_S = 0.005
FIRST_EVENT_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class StartSample:
    first_event_s: float
    cpu_s: float


def first_event(spec: ContenderSpec, *, sqs: Any, queue_url: str, sink: Sink, log_dir: Path,
                body_size: int = 200, timeout: float = FIRST_EVENT_TIMEOUT_S) -> StartSample:
    sink.reset()
    stamp_us = time.time_ns() // 1000
    send_batch(sqs, queue_url, [body(0, body_size, sent_us=stamp_us)])
    exec_us = time.time_ns() // 1000
    started = time.monotonic()
    cpu: dict[int, float] = {}  # pid -> its latest reading

    def read(pids: list[int]) -> None:
        # A process read as it ends reads 0.0: CPU only grows, so keep the larger reading.
        for pid, seconds in procstat.process_cpu(pids).items():
            cpu[pid] = max(seconds, cpu.get(pid, 0.0))

    with ContenderProcess(spec, log_dir) as proc:
        while True:
            read(proc.pids())
            if sink.unique() >= 1:
                read(proc.pids())
                break
            if not proc.alive():
                raise RuntimeError(f"{spec.label} exited with code {proc.proc.returncode} before the first "
                                   f"event; log tail:\n{proc.log_tail()}")
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"{spec.label}: no event {timeout:.0f} s after exec; log tail:\n{proc.log_tail()}")
            time.sleep(POLL_S)
        proc.kill()
    latencies = sink.latencies_us()
    if not latencies:
        raise RuntimeError(f"{spec.label}: the sink got an event without the send stamp")
    arrival_us = stamp_us + latencies[0]
    return StartSample(first_event_s=(arrival_us - exec_us) / 1e6, cpu_s=sum(cpu.values()))
