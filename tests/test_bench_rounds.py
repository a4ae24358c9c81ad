"""The benchmark's rounds: a ratio target's two rows are drawn in the same rounds (A B A B), so
the box's drift between minutes falls on both. The drains are stubbed: this is about the order."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from benchmarks import scenarios
from benchmarks.config import SuiteConfig
from benchmarks.model import FAST, REMOTE, Throughput


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
