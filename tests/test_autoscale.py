"""poller.autoscale: when --processes auto adds or retires a worker, driven with a fake clock and
made-up worker numbers (no processes)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from poller.autoscale import Autoscaler, Decision, Load, Policy, WorkerLoad

BATCH, HELD = 10, 100
TURN = 0.5  # the supervisor's turn


@dataclass
class FakeWorker:
    """A worker's running totals, advanced turn by turn at a chosen CPU share and receive fill."""

    slot: int
    pid: int
    cpu: float = 0.0
    receives: int = 0
    received: int = 0
    in_flight: int = 0

    def advance(self, seconds: float, share: float, fill: int) -> None:
        self.cpu += share * seconds
        self.receives += 4
        self.received += 4 * fill

    def load(self) -> WorkerLoad:
        return WorkerLoad(key=(self.slot, self.pid), cpu=self.cpu, receives=self.receives,
                          received=self.received, in_flight=self.in_flight)


@dataclass
class Run:
    """The supervisor's side: workers, a clock, the acked total and the machine's idle CPU."""

    scaler: Autoscaler
    workers: list[FakeWorker] = field(default_factory=lambda: [FakeWorker(0, 100)])
    now: float = 0.0
    acked: float = 0.0
    idle: float = 0.0
    decisions: list[tuple[float, Decision]] = field(default_factory=list)

    def go(self, seconds: float, *, share: float, fill: int, rate: float, spare: float | None = 1.5) -> None:
        """Run ``seconds`` with every worker at ``share`` of a core, receives ``fill`` full, the
        poller acknowledging ``rate`` msg/s and ``spare`` CPUs idle; apply each decision."""
        end = self.now + seconds
        while self.now < end:
            self.now += TURN
            self.acked += rate * TURN
            if spare is not None:
                self.idle += spare * TURN
            for w in self.workers:
                w.advance(TURN, share, fill)
            decision = self.scaler.turn(Load(now=self.now, active=len(self.workers),
                                             workers=[w.load() for w in self.workers], acked=int(self.acked),
                                             idle_cpu=self.idle if spare is not None else None))
            if decision.change or decision.reason:
                self.decisions.append((self.now, decision))
            if decision.change > 0:
                self.workers.append(FakeWorker(len(self.workers), 100 + len(self.workers)))
            elif decision.change < 0:
                self.workers.pop()

    def changes(self) -> list[int]:
        return [d.change for _, d in self.decisions if d.change]


def make_run(maximum: int = 2, **policy: float) -> Run:
    return Run(Autoscaler(1, maximum, batch_size=BATCH, max_in_flight=HELD, policy=Policy(**policy)))


def test_adds_a_worker_while_the_one_is_saturated_and_a_backlog_waits() -> None:
    run = make_run()
    run.go(20, share=0.95, fill=10, rate=1000)
    assert run.changes() == [1]
    when, decision = run.decisions[0]
    assert 7 <= when <= 12  # (most of) a window to measure, then sustained for a few seconds
    assert "0.95 of a core" in decision.reason and "receives come back full" in decision.reason


def test_no_worker_without_a_backlog_or_below_busy() -> None:
    run = make_run()
    run.go(60, share=0.95, fill=2, rate=1000)  # busy, but receives come back nearly empty
    run.go(60, share=0.6, fill=10, rate=1000)  # a backlog, but the worker has room
    assert run.changes() == []


def test_a_short_burst_adds_nothing() -> None:
    run = make_run()
    run.go(6, share=0.95, fill=10, rate=1000)
    run.go(30, share=0.3, fill=1, rate=100)
    assert run.changes() == []


def test_never_above_the_maximum() -> None:
    run = make_run(maximum=3)
    for _ in range(120):  # each worker adds its 1000 msg/s: every trial succeeds
        run.go(1, share=0.95, fill=10, rate=1000 * len(run.workers))
    assert run.changes() == [1, 1] and len(run.workers) == 3


def test_no_worker_without_spare_cpu_said_once() -> None:
    run = make_run()
    run.go(60, share=0.95, fill=10, rate=1000, spare=0.2)
    assert run.changes() == []
    holds = [d.reason for _, d in run.decisions]
    assert len(holds) == 1 and "only 0.20 CPU spare" in holds[0]


def test_unknown_spare_cpu_does_not_block() -> None:
    run = make_run()
    run.go(20, share=0.95, fill=10, rate=1000, spare=None)
    assert run.changes() == [1]


def test_the_quota_bounds_the_spare_cpu() -> None:
    run = Run(Autoscaler(1, 2, batch_size=BATCH, max_in_flight=HELD, quota=1.2))
    used = 0.0
    for _ in range(60):  # the container uses 1.0 CPU of its 1.2: 0.2 spare, whatever the node has idle
        run.now += TURN
        used += 1.0 * TURN
        run.idle += 8 * TURN
        run.workers[0].advance(TURN, 0.95, 10)
        decision = run.scaler.turn(Load(now=run.now, active=1, workers=[run.workers[0].load()], acked=0,
                                        idle_cpu=run.idle, used_cpu=used))
        assert decision.change == 0
    assert run.scaler._spare() == pytest.approx(0.2)


def test_a_worker_that_does_not_raise_the_rate_is_retired_and_not_tried_again_soon() -> None:
    run = make_run()
    run.go(12, share=0.95, fill=10, rate=1000)
    assert run.changes() == [1]
    run.go(30, share=0.95, fill=10, rate=1020)  # two workers, the same rate: no CPU to gain
    assert run.changes() == [1, -1]
    retired = next(d for _, d in run.decisions if d.change < 0)
    assert "did not raise the rate" in retired.reason and "no new one for 60s" in retired.reason
    run.go(40, share=0.95, fill=10, rate=1000)
    assert run.changes() == [1, -1]  # within the 60 s
    assert "a recent one did not raise the rate" in run.decisions[-1][1].reason
    run.go(20, share=0.95, fill=10, rate=1000)
    assert run.changes() == [1, -1, 1]  # then tried again


def test_a_burst_cleared_during_the_trial_is_no_failed_trial() -> None:
    """The added worker helped drain a burst: by the trial's end the queue is empty and the rate
    is low. Not a failure (no penalty on the next up): the load-fits rule retires it later."""
    run = make_run()
    run.go(12, share=0.95, fill=10, rate=1000)
    assert run.changes() == [1]
    run.go(30, share=0.2, fill=0, rate=0)  # the burst is gone: empty receives
    assert not any("did not raise the rate" in d.reason for _, d in run.decisions)
    run.go(20, share=0.2, fill=0, rate=0)
    assert run.changes() == [1, -1] and "fits in 1 worker(s)" in run.decisions[-1][1].reason
    run.go(20, share=0.95, fill=10, rate=1000)  # the next burst: an up at once, no retry wait
    assert run.changes() == [1, -1, 1]


def test_a_worker_that_raises_the_rate_stays_and_the_load_going_retires_it() -> None:
    run = make_run()
    run.go(12, share=0.95, fill=10, rate=1000)
    run.go(30, share=0.9, fill=10, rate=1800)
    assert run.changes() == [1] and len(run.workers) == 2
    run.go(25, share=0.25, fill=1, rate=200)  # the backlog is gone: 0.5 of a core in all fits in one
    assert run.changes() == [1]  # not before the keepalive
    run.go(15, share=0.25, fill=1, rate=200)
    assert run.changes() == [1, -1] and len(run.workers) == 1
    _, down = run.decisions[-1]
    assert "fits in 1 worker(s)" in down.reason
    run.go(120, share=0.1, fill=0, rate=10)
    assert run.changes() == [1, -1]  # never below the minimum


def test_no_flapping_at_the_load_that_made_the_up() -> None:
    run = make_run()
    run.go(12, share=0.95, fill=10, rate=1000)
    run.go(300, share=0.55, fill=10, rate=1900)  # two workers at 0.55: 1.1 in all does not fit one at 0.6
    assert run.changes() == [1]


def test_a_restarted_worker_starts_its_history_again() -> None:
    run = make_run()
    run.go(8, share=0.95, fill=10, rate=1000)
    run.workers[0] = FakeWorker(0, 999)  # crashed and respawned: its totals start from 0
    run.go(3, share=0.95, fill=10, rate=1000)
    assert run.changes() == []  # no share until the new one has a window
    run.go(15, share=0.95, fill=10, rate=1000)
    assert run.changes() == [1]


def test_a_worker_holding_its_most_is_a_backlog() -> None:
    run = make_run()
    run.workers[0].in_flight = HELD
    run.go(20, share=0.95, fill=0, rate=1000)
    assert run.changes() == [1]
    assert "holds --max-in-flight" in run.decisions[0][1].reason


def test_bounds() -> None:
    with pytest.raises(ValueError):
        Autoscaler(0, 2, batch_size=BATCH, max_in_flight=HELD)
    with pytest.raises(ValueError):
        Autoscaler(3, 2, batch_size=BATCH, max_in_flight=HELD)


# -- the option: --processes auto | N, --max-processes ---------------------------------------------


def test_processes_auto_scales_up_to_max_processes_or_the_quota() -> None:
    from poller.boot import _processes
    from poller.cpus import default_processes

    assert _processes({"processes": 3, "max_processes": None, "max_rate": 0.0}) == (3, False, "--processes")
    assert _processes({"processes": "auto", "max_processes": 4, "max_rate": 0.0}) == (4, True, "--max-processes")
    most, why = default_processes()
    assert _processes({"processes": "auto", "max_processes": None, "max_rate": 0.0}) == (most, most > 1, why)
    assert _processes({"processes": "auto", "max_processes": 1, "max_rate": 0.0})[:2] == (1, False)
    # --max-rate splits its rate across the workers: their number stays fixed
    n, auto, why = _processes({"processes": "auto", "max_processes": 2, "max_rate": 100.0})
    assert (n, auto) == (2, False) and "--max-rate" in why


@pytest.mark.parametrize(("value", "parsed"), [("auto", "auto"), ("AUTO", "auto"), ("1", 1), ("256", 256)])
def test_processes_takes_auto_or_a_number(value: str, parsed: object) -> None:
    from poller.options import _click_type, option

    assert _click_type(option("--processes")).convert(value, None, None) == parsed


@pytest.mark.parametrize("value", ["0", "257", "many"])
def test_processes_refuses_the_rest(value: str) -> None:
    import click

    from poller.options import _click_type, option

    with pytest.raises(click.BadParameter, match="neither auto nor"):
        _click_type(option("--processes")).convert(value, None, None)


@pytest.mark.parametrize(("args", "processes", "auto", "warned"), [
    ([], None, True, False),
    (["--max-processes", "3"], 3, True, False),
    (["--processes", "2"], 2, False, False),
    (["--processes", "2", "--max-processes", "3"], 2, False, True),
])
def test_the_plan_from_the_flags(args: list[str], processes: int | None, auto: bool, warned: bool) -> None:
    from poller.boot import make_plan
    from poller.cli import CHANNELS, run
    from poller.cpus import default_processes

    argv = ["--queue-url", "http://127.0.0.1:9/000000000000/q", "--endpoint-url", "http://127.0.0.1:9",
            "--region", "us-east-1", "--sink", "http://127.0.0.1:9/", *args]
    with run.make_context("run", argv) as ctx:
        plan = make_plan(ctx.params, CHANNELS, reach_queue=False)
    most = processes or default_processes()[0]
    assert plan.config.processes == most
    assert plan.config.autoscale == (auto and most > 1)
    assert any("--max-processes is for --processes auto" in w for w in plan.warnings) == warned
