"""The supervisor: runs N worker processes and keeps them alive. It only supervises.

Like gunicorn's arbiter: signal handlers only queue the signal; the main loop reaps dead workers,
respawns them with a backoff, kills workers whose heartbeat stopped (``worker_timeout``), logs
the throughput line, and on SIGTERM/SIGINT stops the workers gracefully, then kills whatever is
left after the shutdown timeout.

A worker that exits with ``EXIT_BOOT`` could not start its channel. During the poller's own start
(until a first worker has sent a heartbeat: the channel works with this configuration) that means
the poller cannot work at all: respawning would only loop, so the supervisor stops everything and
exits with that code, like gunicorn's ``HaltServer``. Later, it means an outage (a broker down
while a worker is replaced): the worker is respawned with a backoff while the others keep going.

Workers are started with multiprocessing's ``spawn`` method: a fresh interpreter per worker, so
no threads, locks or sockets of the parent are inherited (fork after threads is unsafe).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from multiprocessing.process import BaseProcess
from typing import Any

from poller.config import RunConfig
from poller.stats import FIELDS, GAUGES, format_line
from poller.worker import EXIT_BOOT, worker_main

__all__ = ["Supervisor"]

log = logging.getLogger(__name__)

_RESTART_BACKOFF_MAX = 30.0
_HEALTHY_AFTER = 30.0  # a worker that ran this long before dying resets its restart backoff


@dataclass(slots=True)
class _Slot:
    index: int
    stats: Any  # multiprocessing.Array of FIELDS, written by the worker
    heartbeat: Any  # multiprocessing.Value("d"): the worker's last healthy moment (time.monotonic)
    process: BaseProcess | None = None
    started_at: float = 0.0
    booted: bool = False  # has sent a heartbeat since it was started
    killed: bool = False  # SIGKILLed for want of a heartbeat; the reaper respawns it
    failures: int = 0
    restarts: int = 0
    respawn_at: float = 0.0
    retired: list[int] = field(default_factory=lambda: [0] * len(FIELDS))


class Supervisor:
    def __init__(self, config: RunConfig, *, worker_target: Callable[..., None] = worker_main) -> None:
        """``worker_target(slot, worker_config, stats, parent_pid, heartbeat)`` runs in each worker
        process (a module-level function: spawn pickles it by name)."""
        self.config = config
        self._worker_target = worker_target
        self._ctx = multiprocessing.get_context("spawn")
        self._signals: queue.SimpleQueue[int] = queue.SimpleQueue()
        # Workers must finish before the supervisor's own deadline, to exit cleanly within it.
        margin = min(2.0, config.shutdown_timeout * 0.2)
        self._worker_config = replace(config.worker, shutdown_timeout=config.shutdown_timeout - margin)
        self._slots = [
            _Slot(index=i, stats=self._ctx.Array("q", len(FIELDS), lock=False),
                  heartbeat=self._ctx.Value("d", 0.0, lock=False))
            for i in range(config.processes)
        ]
        self._starting = True  # until a worker has sent its first heartbeat

    def serve_metrics(self, host: str, port: int) -> None:
        """Prometheus ``/metrics`` from the workers' counters; OSError if the port is taken."""
        from poller.metrics import PollerCollector, serve_metrics

        collector = PollerCollector(
            totals=self._totals,
            workers=lambda: sum(1 for s in self._slots if s.process is not None and s.process.is_alive()),
            restarts=lambda: sum(s.restarts for s in self._slots),
        )
        serve_metrics(collector, host, port)
        log.info("metrics on http://%s:%d/metrics", host, port)

    def _on_signal(self, signum: int, frame: object) -> None:
        """No logging, no work: just queue the signal for the main loop."""
        self._signals.put_nowait(signum)

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_signal)
        for slot in self._slots:
            self._spawn(slot)
        last_totals, last_time = self._totals(), time.monotonic()
        while True:
            try:
                signum = self._signals.get(timeout=0.5)
            except queue.Empty:
                signum = None
            if signum in (signal.SIGTERM, signal.SIGINT):
                log.info("received %s: stopping %d worker(s) (timeout %.0fs)",
                         signal.Signals(signum).name, len(self._slots), self.config.shutdown_timeout)
                self._stop()
                return 0
            if signum == signal.SIGHUP:
                log.info("received SIGHUP: nothing to reload; send SIGTERM to stop")
            if self._reap():
                self._stop()
                return EXIT_BOOT
            self._check_heartbeats()
            self._respawn_due()
            now = time.monotonic()
            if now - last_time >= self.config.stats_interval:
                totals = self._totals()
                log.info(format_line(totals, last_totals, now - last_time))
                last_totals, last_time = totals, now

    # -- workers ----------------------------------------------------------------------------

    def _spawn(self, slot: _Slot) -> None:
        process = self._ctx.Process(
            target=self._worker_target,
            args=(slot.index, self._worker_config, slot.stats, os.getpid(), slot.heartbeat),
            name=f"worker-{slot.index}",
        )
        slot.heartbeat.value = 0.0
        process.start()
        slot.process, slot.started_at, slot.booted, slot.killed = process, time.monotonic(), False, False
        log.info("started worker-%d (pid %d)", slot.index, process.pid)

    def _reap(self) -> bool:
        """Note dead workers and schedule their respawn; True if one could not boot."""
        now = time.monotonic()
        for slot in self._slots:
            process = slot.process
            if process is None or process.is_alive():
                continue
            process.join()
            code = process.exitcode
            slot.process = None
            self._retire_stats(slot)
            self._note_boot(slot)  # it may have sent a heartbeat we had not seen yet
            if code == EXIT_BOOT and self._starting:
                log.error("worker-%d could not start (exit %d); stopping all workers", slot.index, code)
                return True
            lived = now - slot.started_at
            slot.failures = 0 if lived >= _HEALTHY_AFTER else slot.failures + 1
            delay = min(_RESTART_BACKOFF_MAX, 0.5 * 2 ** (slot.failures - 1)) if slot.failures else 0.0
            slot.respawn_at = now + delay
            slot.restarts += 1
            if code == EXIT_BOOT:
                log.warning("worker-%d (pid %d) could not start its channel (see its error above); "
                            "retrying in %.1fs while the other workers keep going", slot.index, process.pid, delay)
            else:
                log.warning("worker-%d (pid %d) %s after %.1fs; restarting in %.1fs",
                            slot.index, process.pid, _describe_exit(code), lived, delay)
        return False

    def _check_heartbeats(self) -> None:
        """Kill workers that sent no heartbeat for ``worker_timeout`` (they are respawned)."""
        now = time.monotonic()
        timeout = self.config.worker_timeout
        for slot in self._slots:
            process = slot.process
            if process is None or slot.killed or not process.is_alive():
                continue
            self._note_boot(slot)
            last = max(slot.heartbeat.value, slot.started_at)  # a booting worker gets worker_timeout
            if now - last > timeout:
                log.error("worker-%d (pid %d) sent no heartbeat for %.0fs (--worker-timeout); killing it",
                          slot.index, process.pid, now - last)
                _send(process, signal.SIGKILL)
                slot.killed = True

    def _note_boot(self, slot: _Slot) -> None:
        if not slot.booted and slot.heartbeat.value >= slot.started_at > 0:
            slot.booted = True
            self._starting = False

    def _respawn_due(self) -> None:
        now = time.monotonic()
        for slot in self._slots:
            if slot.process is None and now >= slot.respawn_at:
                self._spawn(slot)

    def _stop(self) -> None:
        deadline = time.monotonic() + self.config.shutdown_timeout
        alive = [s.process for s in self._slots if s.process is not None and s.process.is_alive()]
        for process in alive:
            _send(process, signal.SIGTERM)
        while any(p.is_alive() for p in alive) and time.monotonic() < deadline:
            try:
                signum = self._signals.get(timeout=0.1)
            except queue.Empty:
                continue
            if signum in (signal.SIGTERM, signal.SIGINT):
                log.warning("second %s: killing the workers now", signal.Signals(signum).name)
                break
        for process in alive:
            if process.is_alive():
                log.warning("worker %s (pid %d) did not stop in time; killing it", process.name, process.pid)
                _send(process, signal.SIGKILL)
            process.join(5.0)
        for slot in self._slots:
            if slot.process is not None:
                self._retire_stats(slot)
        log.info("stopped. %s", format_line(self._totals(), [0] * len(FIELDS), 0.0).split("| ", 1)[1])

    # -- stats ------------------------------------------------------------------------------

    def _retire_stats(self, slot: _Slot) -> None:
        """Fold a dead worker's counters into the slot's history and zero the shared array."""
        for i, name in enumerate(FIELDS):
            if name not in GAUGES:
                slot.retired[i] += slot.stats[i]
            slot.stats[i] = 0

    def _totals(self) -> list[int]:
        return [
            sum(slot.retired[i] + slot.stats[i] for slot in self._slots) for i in range(len(FIELDS))
        ]


def _send(process: BaseProcess, signum: int) -> None:
    try:
        os.kill(process.pid, signum)  # type: ignore[arg-type]
    except ProcessLookupError:
        pass


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"
