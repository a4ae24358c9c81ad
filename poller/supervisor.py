"""The supervisor: runs N worker processes and keeps them alive. It only supervises.

Like gunicorn's arbiter: signal handlers only queue the signal; the main loop reaps dead workers,
respawns them with a backoff, kills workers whose heartbeat stopped (``worker_timeout``), logs
the throughput line, and on SIGTERM/SIGINT stops the workers gracefully, then kills whatever is
left after the shutdown timeout. It owns the run's lifetime: batch mode (``--until-empty``,
``--max-messages``) and ``--max-duration`` end the run as SIGTERM does, with exit 0.

A worker that exits with ``EXIT_BOOT`` could not start its channel. During the poller's own start
(until a first worker has sent a heartbeat: the channel works with this configuration) that means
the poller cannot work at all: respawning would only loop, so the supervisor stops everything and
exits with that code, like gunicorn's ``HaltServer``. Later, it means an outage (a broker down
while a worker is replaced): the worker is respawned with a backoff while the others keep going.

Health (``health()`` for /healthz, ``ready()`` for /readyz). Liveness asks "would restarting this
process help?": yes when the supervisor's own loop is stuck, or when no worker has been healthy
(alive and sending its heartbeat) for ``worker_timeout`` + the longest restart backoff, longer
than one worker's whole kill-and-restart cycle. One crash-looping or stuck worker is not a
liveness failure: the supervisor already restarts it (and kills it after ``worker_timeout``
without a heartbeat) while the others keep going. Readiness asks "is this pod polling now?":
started, not stopping, and at least one worker healthy. The HTTP thread reads what the main loop
saw on its last turn (``WorkerStates``), so the probes never touch the worker processes.

Workers that follow the load (``--processes auto``, ``RunConfig.autoscale``): there is a slot
per worker the poller may run, one is started, and once per turn ``poller.autoscale`` says from
what the workers published (their CPU, their receives, what they hold) whether to start the
next slot's worker or retire the newest one. A retired worker stops as on SIGTERM (what it holds
is settled or given back), is not restarted, and its counters still count; a slot that is not
wanted is not a problem for the probes, and batch mode waits only for the wanted ones.

How workers start. ``fork`` while it is safe, else ``spawn`` (a fresh interpreter: ~0.4 s of CPU
more per worker measured here, importing what the supervisor has imported already). A forked child
is a copy of the supervisor with one thread, the one that forked; what the copy holds:

- Locks: a lock held by another thread at the fork stays locked in the child forever (the
  allocator's, logging's, a C library's). So fork only while the supervisor has one OS thread
  (``/proc/self/task``, which counts C libraries' threads too, librdkafka's), and spawn otherwise.
  The one thread of its own, the HTTP server's, starts after the first workers (``run``): they
  are forked, and the first receive does not wait for the server. Workers started later (a
  restart, one autoscale adds) are spawned while the server runs.
- Signal handlers: the supervisor's would queue a signal in the child's copy of the queue, where
  nobody reads it. SIGTERM, SIGINT and SIGHUP are blocked across the start (fork or spawn); the
  child's first code (``_worker_process``) puts back their default actions, then unblocks them:
  a signal sent meanwhile ends it then. The worker's loop installs its own (a graceful stop).
- File descriptors: the start checks close their connections before the first worker starts;
  the HTTP server's listening socket is bound before the fork (a port in use stops the start
  before any worker exists) and closed in a forked child before its worker runs.
- Modules: imported already, which is the point.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import socket
import sys
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from multiprocessing import util
from multiprocessing.context import ForkContext, SpawnContext
from multiprocessing.process import BaseProcess
from typing import Any

from poller.autoscale import Autoscaler, Load, Policy, WorkerLoad
from poller.config import RunConfig
from poller.cpus import container_cpu_seconds, cpu_quota, idle_cpu_seconds
from poller.exits import EXIT_BOOT
from poller.stats import FIELDS, SLOTS, format_line, histogram_count, is_gauge
from poller.worker import worker_main

__all__ = ["Supervisor", "WorkerStates"]

log = logging.getLogger(__name__)

_RESTART_BACKOFF_MAX = 30.0
_HEARTBEAT_LATE = 10.0  # a heartbeat older than this: the worker is not healthy (one a second is normal)
_LOOP_STUCK = 5.0  # /healthz: the main loop turns every 0.5 s at most
_HEALTHY_AFTER = 30.0  # a worker that ran this long before dying resets its restart backoff
_ACKED, _RECEIVED, _IN_FLIGHT, _CPU_MS = (FIELDS.index(f) for f in ("acked", "received", "in_flight", "cpu_ms"))
_HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # the supervisor's handlers (run)


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
    retired: list[int] = field(default_factory=lambda: [0] * SLOTS)
    wanted: bool = True  # to be running: started, and restarted when it dies (autoscale clears it)
    retire_by: float = 0.0  # a worker being retired is killed if still alive then


@dataclass(frozen=True, slots=True)
class WorkerStates:
    """What the main loop saw of the workers on its last turn; read by the HTTP thread."""

    healthy: int = 0  # alive and sending their heartbeat
    notes: tuple[str, ...] = ()  # one line per worker that is not healthy


class Supervisor:
    def __init__(self, config: RunConfig, *, worker_target: Callable[..., None] = worker_main,
                 autoscale: Policy | None = None) -> None:
        """``worker_target(slot, worker_config, stats, parent_pid, heartbeat, budget)`` runs in each
        worker process (a module-level function: spawn pickles it by name); ``autoscale``: the
        thresholds of ``--processes auto`` (``config.autoscale``)."""
        self.config = config
        self._worker_target = worker_target
        # The shared memory is made through spawn's context: it serves forked workers as well.
        self._ctx = multiprocessing.get_context("spawn")
        self._fork = multiprocessing.get_context("fork") if sys.platform == "linux" else None
        self._http: tuple[socket.socket, bool] | None = None  # bound by serve_http, served by run
        self._served = False  # the HTTP server's thread was started: workers are spawned from then on
        self._signals: queue.SimpleQueue[int] = queue.SimpleQueue()
        # Workers must finish before the supervisor's own deadline, to exit cleanly within it.
        margin = min(2.0, config.shutdown_timeout * 0.2)
        self._worker_config = replace(config.worker, shutdown_timeout=config.shutdown_timeout - margin)
        self._slots = [
            _Slot(index=i, stats=self._ctx.Array("q", SLOTS, lock=False),
                  heartbeat=self._ctx.Value("d", 0.0, lock=False), wanted=i == 0 or not config.autoscale)
            for i in range(config.processes)
        ]
        self._autoscaler = (
            Autoscaler(1, config.processes, batch_size=config.worker.batch_size,
                       max_in_flight=config.worker.max_in_flight, quota=cpu_quota(), policy=autoscale or Policy())
            if config.autoscale else None
        )
        # --max-messages: what the workers may still receive, shared (they take from it per receive).
        self._budget = self._ctx.Value("q", config.max_messages) if config.max_messages else None
        self._starting = True  # until a worker has sent its first heartbeat
        self._stopping = False
        self._loop_at = time.monotonic()  # the main loop's last turn (for /healthz)
        self._healthy_at = self._loop_at  # the last turn that saw a healthy worker (or the start)
        self._states = WorkerStates()

    def serve_http(self, host: str, port: int, *, metrics: bool) -> None:
        """/healthz, /readyz and (``metrics``) Prometheus /metrics; OSError if the port is taken.
        The port is bound now and served from a thread once ``run`` started the first workers."""
        listener = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                        backlog=128)
        util.register_after_fork(listener, socket.socket.close)  # a forked worker does not hold the port
        self._http = (listener, metrics)

    def _serve_http(self) -> None:
        if self._http is None:
            return
        listener, metrics = self._http
        host, port = listener.getsockname()[:2]
        self._served = True
        from poller.metrics import PollerCollector, serve  # prometheus_client: after the first workers

        collector = None
        if metrics:
            worker = self.config.worker
            collector = PollerCollector(
                totals=self._totals,
                workers=lambda: sum(1 for s in self._slots if s.process is not None and s.process.is_alive()),
                restarts=lambda: sum(s.restarts for s in self._slots),
                target=lambda: sum(1 for s in self._slots if s.wanted),
                queue=worker.target.queue_url.rstrip("/").rsplit("/", 1)[-1],
                channel=worker.channel.name,
                healthy=lambda: self._states.healthy,
            )
        serve(host, port, health=self.health, ready=self.ready, collector=collector, sock=listener)
        log.info("serving /healthz, /readyz%s on http://%s:%d", ", /metrics" if metrics else "", host, port)

    @property
    def no_worker_limit(self) -> float:
        """Seconds without any healthy worker after which /healthz fails: longer than one
        worker's stall (``worker_timeout``, then killed) plus the longest restart backoff."""
        return self.config.worker_timeout + _RESTART_BACKOFF_MAX

    def health(self, now: float | None = None) -> tuple[bool, str]:
        """For /healthz (another thread): the main loop turns, and some worker was healthy within
        ``no_worker_limit``. The reason lists the workers that are not healthy, also with 200."""
        now = time.monotonic() if now is None else now
        states = self._states
        problems = []
        if now - self._loop_at > _LOOP_STUCK:
            problems.append(f"the supervisor's loop has not turned for {now - self._loop_at:.0f}s")
        elif now - self._healthy_at > self.no_worker_limit:
            problems.append(f"no worker has been healthy for {now - self._healthy_at:.0f}s "
                            f"(the limit is {self.no_worker_limit:g}s)")
        return not problems, "; ".join([*problems, *states.notes]) or "ok"

    def ready(self) -> tuple[bool, str]:
        """For /readyz: SQS answered (the CLI's check, before this), a worker started its channel,
        and a worker is healthy now; not while stopping."""
        if self._stopping:
            return False, "stopping"
        if self._starting:
            return False, "starting: no worker has started its channel yet"
        states = self._states
        if not states.healthy:
            return False, "no worker is healthy: " + "; ".join(states.notes)
        return True, "; ".join(states.notes)

    def _observe(self, now: float) -> None:
        """The main loop's look at the workers, for the probes and the healthy-workers gauge."""
        healthy = 0
        notes = []
        for slot in self._slots:
            if not slot.wanted:  # not started, or being retired: nothing to report
                continue
            process = slot.process
            if process is None or not process.is_alive():
                wait = max(0.0, slot.respawn_at - now)
                notes.append(f"worker-{slot.index} is not running (restarting in {wait:.0f}s)")
                continue
            beat = slot.heartbeat.value
            if beat < slot.started_at:
                notes.append(f"worker-{slot.index} is starting ({now - slot.started_at:.0f}s)")
            elif now - beat > _HEARTBEAT_LATE:
                notes.append(f"worker-{slot.index} sent no heartbeat for {now - beat:.0f}s")
            else:
                healthy += 1
        self._states = WorkerStates(healthy, tuple(notes))
        if healthy:
            self._healthy_at = now

    def _on_signal(self, signum: int, frame: object) -> None:
        """No logging, no work: just queue the signal for the main loop."""
        self._signals.put_nowait(signum)

    def run(self) -> int:
        for handled in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(handled, self._on_signal)
        for slot in self._slots:
            if slot.wanted:
                self._spawn(slot)
        self._serve_http()  # only now: the first workers were forked from a process with one thread
        last_totals, last_time = self._totals(), time.monotonic()
        max_duration = self.config.max_duration
        deadline = last_time + max_duration if max_duration is not None else None
        while True:
            wait = 0.5 if deadline is None else min(0.5, max(0.0, deadline - time.monotonic()))
            try:
                signum = self._signals.get(timeout=wait)
            except queue.Empty:
                signum = None
            self._loop_at = time.monotonic()
            if signum in (signal.SIGTERM, signal.SIGINT):
                log.info("received %s: stopping %d worker(s) (timeout %.0fs)", signal.Signals(signum).name,
                         sum(1 for s in self._slots if s.process is not None), self.config.shutdown_timeout)
                self._stop()
                return 0
            if signum == signal.SIGHUP:
                log.info("received SIGHUP: nothing to reload; send SIGTERM to stop")
            if self._reap():
                self._stop()
                return EXIT_BOOT
            self._check_heartbeats()
            self._respawn_due()
            self._observe(time.monotonic())
            if self._autoscaler is not None and not self._starting:
                self._scale(self._autoscaler, time.monotonic())
            if self._batch_done():
                self._stop()
                return 0
            if deadline is not None and time.monotonic() >= deadline:
                received = self._total(_RECEIVED)
                log.info("--max-duration reached (%gs): %d message(s) received; stopping", max_duration, received)
                self._stop()
                return 0
            now = time.monotonic()
            if now - last_time >= self.config.stats_interval:
                totals = self._totals()
                if totals[:len(FIELDS)] != last_totals[:len(FIELDS)]:  # no line while idle
                    log.info(format_line(totals, last_totals, now - last_time))
                last_totals, last_time = totals, now

    def _batch_done(self) -> bool:
        """Batch mode: every worker reports it is drained (receives came back empty, or the
        --max-messages budget is used up, and nothing is held)."""
        if not (self.config.until_empty or self._budget is not None) or self._starting:
            return False
        drained = FIELDS.index("drained")
        if not all(s.process is not None and s.process.is_alive() and s.stats[drained]
                   for s in self._slots if s.wanted):
            return False
        received = self._total(_RECEIVED)
        why = ("--max-messages reached" if self._budget is not None and self._budget.value <= 0
               else "the queue is empty")
        log.info("%s: %d message(s) received; stopping", why, received)
        return True

    # -- autoscale --------------------------------------------------------------------------

    def _scale(self, autoscaler: Autoscaler, now: float) -> None:
        """Ask the policy with what the workers published, and start or retire one worker."""
        workers = []
        for slot in self._slots:
            process, stats = slot.process, slot.stats
            # From its first stats copy on: the CPU of its start (imports, the channel) is not load.
            if slot.wanted and process is not None and slot.booted and stats[_CPU_MS] > 0:
                workers.append(WorkerLoad(key=(slot.index, process.pid or 0), cpu=stats[_CPU_MS] / 1000,
                                          receives=histogram_count(stats, "receive"), received=stats[_RECEIVED],
                                          in_flight=stats[_IN_FLIGHT]))
        occupied = sum(1 for s in self._slots if s.wanted or s.process is not None)  # retiring ones too
        acked = self._total(_ACKED)
        decision = autoscaler.turn(Load(now=now, active=occupied, workers=workers, acked=acked,
                                        idle_cpu=idle_cpu_seconds(), used_cpu=container_cpu_seconds()))
        wanted = [s for s in self._slots if s.wanted]
        if decision.change > 0:
            free = next((s for s in self._slots if not s.wanted and s.process is None), None)
            if free is None:  # the policy counts retiring slots as taken: not expected
                return
            free.wanted, free.failures = True, 0
            log.info("autoscale: adding worker-%d (%d of at most %d): %s", free.index, len(wanted) + 1,
                     len(self._slots), decision.reason)
            self._spawn(free)
        elif decision.change < 0 and len(wanted) > 1:
            newest = wanted[-1]
            newest.wanted = False
            newest.retire_by = now + self.config.shutdown_timeout
            log.info("autoscale: retiring worker-%d (%d left): %s", newest.index, len(wanted) - 1, decision.reason)
            if newest.process is not None:
                _send(newest.process, signal.SIGTERM)  # the usual graceful stop: what it holds is settled
        elif decision.reason:
            log.info("autoscale: %s", decision.reason)

    # -- workers ----------------------------------------------------------------------------

    def _spawn(self, slot: _Slot) -> None:
        ctx = self._start_method()
        process = ctx.Process(
            target=_worker_process,
            args=(self._worker_target, slot.index, self._worker_config, slot.stats, os.getpid(), slot.heartbeat,
                  self._budget),
            name=f"worker-{slot.index}",
        )
        slot.heartbeat.value = 0.0
        with _signals_blocked(), nullcontext() if ctx is self._fork else _main_left_behind():
            process.start()
        slot.process, slot.started_at, slot.booted, slot.killed = process, time.monotonic(), False, False
        log.info("started worker-%d (pid %d, %s)", slot.index, process.pid, ctx.get_start_method())

    def _start_method(self) -> ForkContext | SpawnContext:
        """fork while it is safe (the module's docstring), else spawn."""
        if self._fork is not None and not self._served and _single_threaded():
            return self._fork
        return self._ctx

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
            if not slot.wanted:  # retired by autoscale (or it died while being retired): not restarted
                log.info("worker-%d (pid %d) retired: %s after %.1fs", slot.index, process.pid,
                         "stopped" if code == 0 else _describe_exit(code), now - slot.started_at)
                continue
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
            if not slot.wanted and now > slot.retire_by:
                log.warning("worker-%d (pid %d) did not stop within --shutdown-timeout of its retirement; "
                            "killing it", slot.index, process.pid)
                _send(process, signal.SIGKILL)
                slot.killed = True
                continue
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
            if slot.wanted and slot.process is None and now >= slot.respawn_at:
                self._spawn(slot)

    def _stop(self) -> None:
        self._stopping = True
        deadline = time.monotonic() + self.config.shutdown_timeout
        alive = [s.process for s in self._slots if s.process is not None and s.process.is_alive()]
        for process in alive:
            _send(process, signal.SIGTERM)
        while any(p.is_alive() for p in alive) and time.monotonic() < deadline:
            self._loop_at = time.monotonic()  # draining is turning: /healthz stays 200
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
        log.info("stopped. %s", format_line(self._totals(), [0] * SLOTS, 0.0).split("| ", 1)[1])

    # -- stats ------------------------------------------------------------------------------

    def _retire_stats(self, slot: _Slot) -> None:
        """Fold a dead worker's counters into the slot's history and zero the shared array."""
        for i in range(SLOTS):
            if not is_gauge(i):
                slot.retired[i] += slot.stats[i]
            slot.stats[i] = 0

    def _totals(self) -> list[int]:
        return [self._total(i) for i in range(SLOTS)]

    def _total(self, index: int) -> int:
        """One field of ``_totals``: the live workers' and the retired counts of every slot."""
        return sum(slot.retired[index] + slot.stats[index] for slot in self._slots)


def _worker_process(target: Callable[..., None], *args: Any) -> None:
    """A worker process's first code (module level: spawn pickles it by name). It begins with the
    supervisor's signals blocked (``_signals_blocked``; a spawned interpreter inherits the mask
    through exec): forked, it has the supervisor's handlers, which would queue a signal where
    nobody reads it; spawned, Python's SIGINT handler would raise KeyboardInterrupt, a traceback
    in the middle of its start. Default actions go in first, then the signals are unblocked: one
    sent meanwhile (Ctrl-C reaches the whole group) ends the worker now, quietly, holding nothing
    yet, until the worker's loop installs its own handlers (a graceful stop)."""
    for signum in _HANDLED:
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED)
    target(*args)


def _single_threaded() -> bool:
    """This process has one OS thread: no other can hold a lock a forked child would inherit
    locked. /proc also counts the threads of C libraries, which ``threading`` does not see."""
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


@contextmanager
def _signals_blocked() -> Iterator[None]:
    """The supervisor's signals wait (pending) while a worker is started, see ``_worker_process``;
    here, they are handled once the child exists."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextmanager
def _main_left_behind() -> Iterator[None]:
    """Spawn re-runs the parent's ``__main__`` in the child (for ``poller`` that is the CLI: click,
    cloup, every channel's options, the start checks' modules), though the worker's target is
    pickled by its module and needs none of it. Measured: a third of a worker's start-up CPU.
    Spawn reads ``__main__`` only while ``start()`` prepares the child, so a bare stand-in then
    leaves the parent as it was."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


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
