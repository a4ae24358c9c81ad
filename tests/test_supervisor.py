"""poller.supervisor.Supervisor with real worker processes whose behaviour the test picks.

The supervisor runs in a child process of its own (it installs signal handlers), its workers are
the module-level fakes below, spawned by multiprocessing exactly as the real ones are. The fakes
read what to do from the environment and record each start in a file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from channels.http import HttpConfig
from poller.autoscale import Policy
from poller.config import RunConfig, WorkerConfig
from poller.sqs import SqsTarget
from poller.stats import FIELDS
from poller.supervisor import Supervisor

from support import free_port, http_get, wait_until

TESTS = str(Path(__file__).parent)
REPO = str(Path(__file__).parent.parent)


# -- fake workers (run in spawned processes) ----------------------------------------------------


def _record_start(slot: int) -> int:
    """Append this start to the slot's file; returns how many starts came before it."""
    path = Path(os.environ["FAKE_WORKER_DIR"]) / f"slot-{slot}"
    with open(path, "a") as f:
        f.write(f"{time.monotonic()}\n")
    return len(path.read_text().splitlines()) - 1


def _beat_forever(heartbeat: Any, *, seconds: float = 3600.0) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        heartbeat.value = time.monotonic()
        time.sleep(0.2)


def fake_worker(slot: int, config: Any, stats: Any, parent_pid: int, heartbeat: Any, budget: Any = None) -> None:
    mode = os.environ["FAKE_WORKER_MODE"]
    previous_starts = _record_start(slot)
    if mode == "boot-fail":
        raise SystemExit(3)
    if mode in ("outage-later", "outage-quick"):
        # Slot 0 runs, crashes, and its replacements cannot start twice (a broker outage).
        # "quick": it dies right after its first heartbeat, before the supervisor looked.
        if slot == 0 and previous_starts == 0:
            _beat_forever(heartbeat, seconds=1.5 if mode == "outage-later" else 0.01)
            raise SystemExit(1)
        if slot == 0 and previous_starts <= 2:
            raise SystemExit(3)
        _beat_forever(heartbeat)
    if mode == "silent":
        if previous_starts == 0:
            time.sleep(3600)  # alive, but no heartbeat: stuck
        _beat_forever(heartbeat)
    if mode == "crash":
        heartbeat.value = time.monotonic()
        raise SystemExit(1)
    if mode == "crash-one":  # slot 0 crash-loops, slot 1 works
        if slot == 0:
            heartbeat.value = time.monotonic()
            raise SystemExit(1)
        _beat_forever(heartbeat)
    if mode in ("load", "load-stubborn"):
        if mode == "load-stubborn" and slot == 1:  # a worker that will not stop when retired
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _publish_load(Path(os.environ["FAKE_WORKER_DIR"]), stats, heartbeat)
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _beat_forever(heartbeat)
    raise SystemExit(0)


def _publish_load(directory: Path, stats: Any, heartbeat: Any) -> None:
    """Publish the numbers of a worker at 0.95 of a core with full receives, acknowledging 1000
    msg/s, until a file "idle" appears (then 0.1 of a core, nearly empty receives); stop on
    SIGTERM as a worker does, exit 0."""
    from poller.stats import Counters

    if signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    counters = Counters()
    cpu_ms = 1.0
    while True:
        idle = (directory / "idle").exists()
        cpu_ms += (10 if idle else 95) * 2  # per 0.2 s
        counters.set("cpu_ms", int(cpu_ms))
        for _ in range(4):
            counters.observe("receive", 0.01)
        counters.add("received", 1 if idle else 40)
        counters.add("acked", 1 if idle else 200)
        counters.copy_to(stats)
        heartbeat.value = time.monotonic()
        time.sleep(0.2)


def run_config(processes: int, worker_timeout: float = 5.0, shutdown_timeout: float = 10.0,
               autoscale: bool = False) -> RunConfig:
    worker = WorkerConfig(
        target=SqsTarget(queue_url="http://127.0.0.1:9/000000000000/q", region="us-east-1",
                         endpoint_url="http://127.0.0.1:9"),
        channel=HttpConfig(sink="http://127.0.0.1:9/"),
    )
    return RunConfig(worker=worker, processes=processes, worker_timeout=worker_timeout,
                     shutdown_timeout=shutdown_timeout, stats_interval=3600, autoscale=autoscale)


# --processes auto on a short clock: the machine's spare CPU is not asked (the tests share it).
QUICK_AUTOSCALE = Policy(window=1.0, sustain=1.0, keepalive=3.0, trial=3.0, spare=0.0)


def serve(processes: int, worker_timeout: float, shutdown_timeout: float, health_port: int = 0,
          autoscale: bool = False) -> int:
    """The supervisor's process: run it with the fake workers (and /healthz on ``health_port``)."""
    from poller.logs import setup_logging

    setup_logging("INFO")
    supervisor = Supervisor(run_config(processes, worker_timeout, shutdown_timeout, autoscale),
                            worker_target=fake_worker, autoscale=QUICK_AUTOSCALE)
    if health_port:
        supervisor.serve_http("127.0.0.1", health_port, metrics=True)
    return supervisor.run()


# -- the tests ----------------------------------------------------------------------------------


class Running:
    def __init__(self, tmp_path: Path, mode: str, *, processes: int = 2, worker_timeout: float = 5.0,
                 shutdown_timeout: float = 10.0, health_port: int = 0, autoscale: bool = False) -> None:
        self.dir = tmp_path
        self.log_path = tmp_path / "supervisor.log"
        code = (f"import sys; sys.path[:0] = [{TESTS!r}, {REPO!r}]; from test_supervisor import serve; "
                f"sys.exit(serve({processes}, {worker_timeout}, {shutdown_timeout}, {health_port}, {autoscale}))")
        env = {**os.environ, "FAKE_WORKER_MODE": mode, "FAKE_WORKER_DIR": str(tmp_path)}
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def starts(self, slot: int) -> list[float]:
        path = self.dir / f"slot-{slot}"
        return [float(line) for line in path.read_text().split()] if path.exists() else []

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def running(tmp_path: Path) -> Any:
    started: list[Running] = []

    def start(mode: str, **kwargs: Any) -> Running:
        r = Running(tmp_path, mode, **kwargs)
        started.append(r)
        return r

    yield start
    for r in started:
        r.kill()


@pytest.mark.slow
def test_a_boot_failure_during_start_halts_the_poller_with_exit_3(running: Any) -> None:
    sup = running("boot-fail")
    assert sup.proc.wait(30) == 3
    assert "could not start (exit 3); stopping all workers" in sup.log()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["outage-later", "outage-quick"])
def test_a_boot_failure_of_a_replacement_later_is_retried_while_the_others_keep_going(
    running: Any, mode: str
) -> None:
    sup = running(mode)
    # Slot 0: runs, crashes, fails to start twice (the outage), then starts for good.
    wait_until(lambda: len(sup.starts(0)) >= 4, 60, "slot 0 to be started four times")
    assert sup.proc.poll() is None, "the supervisor halted on a boot failure after its start"
    assert sup.log().count("could not start its channel") == 2
    assert len(sup.starts(1)) == 1  # the other worker kept going, untouched
    assert sup.stop() == 0


@pytest.mark.slow
def test_a_worker_without_heartbeat_is_killed_and_replaced(running: Any) -> None:
    sup = running("silent", processes=1, worker_timeout=5.0)
    wait_until(lambda: len(sup.starts(0)) >= 2, 60, "the stuck worker to be replaced")
    log = sup.log()
    assert "sent no heartbeat for" in log and "killing it" in log
    assert "was killed by SIGKILL" in log
    assert sup.stop() == 0


@pytest.mark.slow
def test_a_crashing_worker_is_restarted_with_a_growing_backoff(running: Any) -> None:
    sup = running("crash", processes=1)
    wait_until(lambda: len(sup.starts(0)) >= 5, 60, "five starts")
    starts = sup.starts(0)
    gaps = [b - a for a, b in pairwise(starts)]
    assert gaps[3] > gaps[0] * 2, f"restarts did not back off: {gaps}"
    assert "restarting in" in sup.log()
    assert sup.stop() == 0


@pytest.mark.slow
def test_a_second_sigterm_kills_the_workers_at_once(running: Any) -> None:
    sup = running("stubborn", shutdown_timeout=600.0)
    wait_until(lambda: len(sup.starts(0)) == 1 and len(sup.starts(1)) == 1, 30, "both workers")
    sup.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "received SIGTERM: stopping" in sup.log(), 10, "the first SIGTERM to be seen")
    sup.proc.send_signal(signal.SIGTERM)
    # The shutdown timeout is 600 s: only the second signal can end it within this wait.
    assert sup.proc.wait(30) == 0
    log = sup.log()
    assert "second SIGTERM: killing the workers now" in log
    assert "did not stop in time; killing it" in log


@pytest.mark.slow
def test_healthz_stays_200_while_one_worker_crash_loops_and_the_other_runs(running: Any) -> None:
    """The restart backoff (0.5, 1, 2 s, ...) keeps slot 0 down much of the time; /healthz is
    200 all along (a pod restart would stop the healthy worker too), /readyz too (one is healthy),
    and the metric counts one healthy worker."""
    port = free_port()
    sup = running("crash-one", health_port=port)
    wait_until(lambda: http_get(port, "/readyz")[0] == 200, 30, "the poller to be ready")
    seen: list[tuple[int, str]] = []
    while len(sup.starts(0)) < 4:
        assert sup.proc.poll() is None, sup.log()
        seen.append(http_get(port, "/healthz")[:2])
        assert seen[-1][0] == 200, seen[-1]
        assert http_get(port, "/readyz")[0] == 200
        time.sleep(0.1)
    assert any("worker-0 is not running (restarting in" in body for _, body in seen), seen[-5:]

    def metrics() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            return response.read().decode()

    # Right after a restart, slot 0 beats once before it crashes again: for that moment the gauge
    # is 2 (seen failing under load). Between restarts (4 s now) it must be 1.
    healthy_one = 'sqs_poller_workers_healthy{channel="http",queue="q"} 1.0'
    wait_until(lambda: healthy_one in metrics(), 10, "the gauge to count one healthy worker", interval=0.05)
    assert len(sup.starts(1)) == 1
    assert sup.stop() == 0


@pytest.mark.slow
def test_auto_adds_a_worker_under_load_and_retires_it_when_idle(running: Any) -> None:
    """--processes auto: one worker; a second while it publishes a saturated loop and full
    receives (and the rate doubles with it); retired (SIGTERM, not restarted, its counts kept)
    once the load fits in one. The probes and the gauges follow."""
    port = free_port()
    sup = running("load", processes=2, autoscale=True, health_port=port)
    wait_until(lambda: len(sup.starts(0)) == 1, 30, "the first worker")
    assert sup.starts(1) == []  # one worker at first
    wait_until(lambda: len(sup.starts(1)) == 1, 30, "a second worker under load")
    assert "autoscale: adding worker-1 (2 of at most 2): workers at 0.9" in sup.log()

    def metrics() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            return response.read().decode()

    wait_until(lambda: 'sqs_poller_workers_target{channel="http",queue="q"} 2.0' in metrics(), 10, "target 2")
    time.sleep(4)  # past the trial: the rate doubled, the worker stays
    assert "retiring" not in sup.log()
    (sup.dir / "idle").write_text("")
    wait_until(lambda: "worker-1 (pid" in sup.log() and "retired: stopped" in sup.log(), 30, "the retirement")
    log = sup.log()
    assert "autoscale: retiring worker-1 (1 left): the load fits in 1 worker(s)" in log
    acked = 'sqs_poller_messages_acked_total{channel="http",queue="q"}'
    before = float(next(line for line in metrics().splitlines() if line.startswith(acked)).split()[-1])
    time.sleep(1.5)  # the retired worker's counts still count: the total does not drop
    after = float(next(line for line in metrics().splitlines() if line.startswith(acked)).split()[-1])
    assert after >= before > 0
    assert 'sqs_poller_workers_target{channel="http",queue="q"} 1.0' in metrics()
    assert 'sqs_poller_worker_restarts_total{channel="http",queue="q"} 0.0' in metrics()
    assert http_get(port, "/healthz")[:2] == (200, "ok\n")  # a retired slot is not a problem
    assert http_get(port, "/readyz")[0] == 200
    assert len(sup.starts(1)) == 1  # not restarted
    assert sup.stop() == 0
    assert "stopping 1 worker(s)" in sup.log()


# -- health() and ready() on made-up workers -----------------------------------------------------


@dataclass
class FakeProcess:
    alive: bool = True
    pid: int = 4242

    def is_alive(self) -> bool:
        return self.alive


NOW = 10_000.0


def supervisor_with(*workers: str, worker_timeout: float = 60.0) -> Supervisor:
    """A supervisor whose slots are in the states given: "healthy", "silent" (alive, last beat 15 s
    ago), "starting" (no beat yet), "restarting" (dead, respawn in 20 s), "unused" and "retiring"
    (not wanted: --processes auto); looked at NOW."""
    sup = Supervisor(run_config(len(workers), worker_timeout=worker_timeout))
    for slot, state in zip(sup._slots, workers, strict=True):
        slot.started_at = NOW - 100
        if state == "unused":  # --processes auto: a slot not started
            slot.wanted, slot.process = False, None
        elif state == "retiring":  # --processes auto: told to stop, still draining (no heartbeat needed)
            slot.wanted, slot.process = False, FakeProcess()  # type: ignore[assignment]
        elif state == "restarting":
            slot.process, slot.respawn_at = None, NOW + 20
        else:
            slot.process = FakeProcess()  # type: ignore[assignment]
            slot.heartbeat.value = {"healthy": NOW - 0.5, "silent": NOW - 15, "starting": 0.0}[state]
            if state == "starting":
                slot.started_at = NOW - 2
    sup._starting = False
    sup._loop_at = sup._healthy_at = NOW
    sup._observe(NOW)
    return sup


def test_all_healthy() -> None:
    sup = supervisor_with("healthy", "healthy")
    assert sup.health(NOW) == (True, "ok")
    assert sup.ready() == (True, "")


@pytest.mark.parametrize(("other", "note"), [
    ("restarting", "worker-1 is not running (restarting in 20s)"),
    ("silent", "worker-1 sent no heartbeat for 15s"),  # --worker-timeout kills it: not liveness' job
    ("starting", "worker-1 is starting (2s)"),
])
def test_one_worker_down_is_noted_but_neither_unhealthy_nor_unready(other: str, note: str) -> None:
    sup = supervisor_with("healthy", other)
    assert sup.health(NOW) == (True, note)
    assert sup.ready() == (True, note)


def test_no_worker_healthy_is_unready_at_once_and_unhealthy_after_the_limit() -> None:
    sup = supervisor_with("restarting", "silent", worker_timeout=60.0)
    ok, reason = sup.ready()
    assert not ok and reason.startswith("no worker is healthy: worker-0 is not running"), reason
    assert sup.health(NOW)[0]
    assert sup.no_worker_limit == 90.0  # --worker-timeout + the longest restart backoff
    sup._loop_at = NOW + 89  # the loop turns, and still no worker
    assert sup.health(NOW + 89)[0]
    sup._loop_at = NOW + 91
    ok, reason = sup.health(NOW + 91)
    assert not ok and reason.startswith("no worker has been healthy for 91s (the limit is 90s)"), reason


def test_a_worker_healthy_again_resets_the_clock() -> None:
    sup = supervisor_with("restarting", "healthy")
    sup._loop_at = NOW + 200
    for slot in sup._slots:
        slot.heartbeat.value = NOW + 199.5
    sup._observe(NOW + 200)
    assert sup.health(NOW + 200)[0]


def test_a_stuck_supervisor_loop_is_unhealthy() -> None:
    sup = supervisor_with("healthy", "healthy")
    ok, reason = sup.health(NOW + 6)
    assert not ok and "loop has not turned for 6s" in reason


def test_stopping_is_unready() -> None:
    sup = supervisor_with("healthy")
    sup._stopping = True
    assert sup.ready() == (False, "stopping")


@pytest.mark.parametrize("other", ["unused", "retiring"])
def test_a_slot_not_wanted_is_no_problem_for_the_probes(other: str) -> None:
    sup = supervisor_with("healthy", other)
    assert sup.health(NOW) == (True, "ok")
    assert sup.ready() == (True, "")
    assert sup._states.healthy == 1


def test_batch_mode_waits_only_for_the_wanted_workers() -> None:
    sup = supervisor_with("healthy", "unused")
    sup.config = replace(sup.config, until_empty=True)
    drained = FIELDS.index("drained")
    assert not sup._batch_done()
    sup._slots[0].stats[drained] = 1
    assert sup._batch_done()  # the slot never started does not hold the run open


def test_a_retired_workers_counts_still_count() -> None:
    sup = supervisor_with("healthy", "retiring")
    acked = FIELDS.index("acked")
    sup._slots[1].stats[acked] = 70
    sup._slots[1].stats[FIELDS.index("in_flight")] = 3
    sup._retire_stats(sup._slots[1])  # what the reaper does when it exits
    totals = sup._totals()
    assert totals[acked] == 70 and totals[FIELDS.index("in_flight")] == 0


@pytest.mark.slow
def test_a_retired_worker_that_does_not_stop_is_killed_after_the_shutdown_timeout(running: Any) -> None:
    sup = running("load-stubborn", processes=2, autoscale=True, shutdown_timeout=3.0)
    wait_until(lambda: len(sup.starts(1)) == 1, 30, "a second worker under load")
    time.sleep(4)  # past the trial
    (sup.dir / "idle").write_text("")
    wait_until(lambda: "retired: was killed by SIGKILL" in sup.log(), 30, "the stubborn worker killed")
    assert "did not stop within --shutdown-timeout of its retirement; killing it" in sup.log()
    assert len(sup.starts(1)) == 1  # not restarted
    assert sup.stop() == 0
