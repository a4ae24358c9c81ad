"""The benchmark's rounds: a ratio target's two rows are drawn in the same rounds (A B A B), so
the box's drift between minutes falls on both. The drains are stubbed: this is about the order."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from benchmarks import report, scenarios
from benchmarks.config import SuiteConfig
from benchmarks.model import FAST, REMOTE, SLOW, Throughput


class _Stub:
    url = "http://127.0.0.1:1/"


def _bench(scenario_names: tuple[str, ...], contenders: tuple[str, ...]) -> scenarios.Bench:
    config = SuiteConfig(scenarios=scenario_names, contenders=contenders, repeats=2, processes=())
    return scenarios.Bench(config=config, sqs=None, endpoint="http://127.0.0.1:2", log_dir=Path("."), bodies=[],
                           fast=_Stub(), proxy=_Stub())  # type: ignore[arg-type]


@pytest.fixture
def drains(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Each drain's scenario/family, in the order they ran; each window a little slower than the last."""
    order: list[str] = []

    def drain(scenario: str, family: str) -> Throughput:
        order.append(f"{scenario}/{family}")
        return Throughput(scenario, family, family, 100, seconds=float(len(order)), cpu_seconds=0.01 * len(order),
                          peer_cpu_seconds={"localstack": 0.05 * len(order)})

    def mq(_bench: Any, scenario: str, *_a: Any, **_k: Any) -> Throughput:
        return drain(scenario, "mq-bridge")

    def run_throughput(_bench: Any, scenario: str, family: str, *_a: Any, **_k: Any) -> Throughput:
        return drain(scenario, family)

    monkeypatch.setattr(scenarios, "_mqbridge_http", mq)
    monkeypatch.setattr(scenarios, "run_throughput", run_throughput)
    return order


def test_remote_windows_alternate_with_the_direct_ones(drains: list[str]) -> None:
    rows = scenarios.throughput_cases(_bench(("fast", "remote"), ("mq-bridge", "poller")))
    fast, remote, mq_remote = f"{FAST}/poller", f"{REMOTE}/poller", f"{REMOTE}/mq-bridge"
    assert drains == [f"{FAST}/mq-bridge", fast, remote, f"{FAST}/mq-bridge", fast, remote, mq_remote]
    by_case = {(r.scenario, r.family): r for r in rows}
    assert by_case[(REMOTE, "poller")].seconds == 3.0  # its best window (least CPU per message) of the two
    assert len(by_case[(REMOTE, "poller")].details["windows"]) == 2
    # each window says the box's pace in it: LocalStack's CPU per message (0.15 s, 0.3 s over 100)
    assert by_case[(REMOTE, "poller")].details["windows"] == [
        "300.0 us/msg at 33 msg/s (LocalStack 1500 us/msg)", "600.0 us/msg at 17 msg/s (LocalStack 3000 us/msg)"]


def test_remote_alone_still_runs_its_windows(drains: list[str]) -> None:
    scenarios.throughput_cases(_bench(("remote",), ("poller",)))
    assert drains == [f"{REMOTE}/poller", f"{REMOTE}/poller"]


def test_the_20ms_sink_pair_alternates_and_keeps_each_best(drains: list[str]) -> None:
    bench = _bench(("slow",), ("mq-bridge", "poller"))
    bench.slow = _Stub()  # type: ignore[assignment]
    rows = scenarios.throughput_cases(bench)
    assert drains == [f"{SLOW}/mq-bridge", f"{SLOW}/poller", f"{SLOW}/mq-bridge", f"{SLOW}/poller"]
    assert [(r.contender, r.seconds) for r in rows] == [("mq-bridge", 1.0), ("poller", 2.0)]
    assert all(len(r.details["windows"]) == 2 for r in rows)


def _window(label: str, latencies_ms: list[float], *, error: str | None = None) -> scenarios.LatencyWindow:
    us = tuple(sorted(int(ms * 1000) for ms in latencies_ms))
    return scenarios.LatencyWindow(label, sent=len(us), seconds=10.0, cpu_seconds=0.001 * len(us),
                                   latencies_us=us, error=error)


def test_latency_windows_alternate_and_each_contender_pools_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[str] = []
    # mq-bridge is steady; the poller's second window has a stall: 2 of its 100 messages wait 500 ms
    shapes = {"mq-bridge": [[10.0] * 100, [10.0] * 100],
              "poller defaults": [[5.0] * 100, [5.0] * 98 + [500.0] * 2]}

    def run_latency(_bench: Any, label: str, _make: Any) -> scenarios.LatencyWindow:
        order.append(label)
        return _window(label, shapes[label][order.count(label) - 1])

    monkeypatch.setattr(scenarios, "run_latency", run_latency)
    bench = _bench(("latency",), ("mq-bridge", "poller"))
    rows = scenarios.latency_cases(bench)
    assert order == ["mq-bridge", "poller defaults", "mq-bridge", "poller defaults"]
    mq, poller = rows
    assert (mq.sent, mq.delivered, mq.p99_ms) == (200, 200, 10.0)
    # alone, the stalled window's p99 is 500 ms; pooled with the other, 2 of 200 are past the 99th
    assert poller.windows == ("p99 5.0 ms, max 5.0 ms", "p99 500.0 ms, max 500.0 ms")
    assert (poller.sent, poller.p50_ms, poller.p99_ms, poller.max_ms) == (200, 5.0, 5.0, 500.0)
    assert poller.cpu_us_per_msg == pytest.approx(1000.0)
    assert poller.seconds == 20.0 and poller.error is None


def test_a_failed_latency_window_fails_the_pooled_row() -> None:
    lost = replace(_window("poller defaults", [5.0] * 90, error="only 90 of 100 arrived"), sent=100)
    row = scenarios.pooled_latency(300, [_window("poller defaults", [5.0] * 100), lost])
    assert row.error == "only 90 of 100 arrived"
    assert row.windows[1] == "only 90 of 100 arrived"
    skipped = scenarios.pooled_latency(300, [scenarios.LatencyWindow("mq-bridge", error="skipped: no PyPI")])
    assert (skipped.error, skipped.sent, skipped.windows) == ("skipped: no PyPI", 0, ())


def test_the_latency_table_names_each_pooled_window() -> None:
    row = scenarios.pooled_latency(300, [_window("poller defaults", [5.0] * 100), _window("poller defaults", [7.0])])
    table = report.latency_table([row])
    assert "2 windows pooled: p99 5.0 ms, max 5.0 ms; p99 7.0 ms, max 7.0 ms" in table
    assert "2 windows pooled" not in report.latency_table([scenarios.pooled_latency(300, [_window("x", [5.0])])])
