"""The benchmark's target checks (benchmarks/targets.py) on hand-made rows: no services."""

from __future__ import annotations

from benchmarks.model import CEILING, SLOW, Throughput
from benchmarks.targets import evaluate

_SLOW_TARGET = "Kept: 20 ms subscriber, rate >= 2x mq-bridge"


def _row(scenario: str, family: str, msg_per_s: float) -> Throughput:
    contender = "poller defaults" if family == "poller" else family
    return Throughput(scenario, contender, family, 1000, seconds=1000 / msg_per_s, cpu_seconds=0.1)


def _slow_outcome(poller: float, mq_bridge: float, ceiling: float):
    rows = [_row(CEILING, "ceiling", ceiling), _row(SLOW, "mq-bridge", mq_bridge), _row(SLOW, "poller", poller)]
    return next(o for o in evaluate(rows, None) if o.target == _SLOW_TARGET)


def test_a_miss_whose_bar_is_above_the_ceiling_says_so_and_stays_a_miss() -> None:
    outcome = _slow_outcome(poller=1621.4, mq_bridge=899.2, ceiling=1704.0)
    assert outcome.met is False
    assert "the bar, 1,798 msg/s, is above this run's boto3 ceiling (1,704 msg/s)" in outcome.measured


def test_a_miss_below_the_ceiling_is_a_plain_miss() -> None:
    outcome = _slow_outcome(poller=1500.0, mq_bridge=899.2, ceiling=2500.0)
    assert outcome.met is False
    assert "ceiling" not in outcome.measured


def test_a_pass_is_a_pass() -> None:
    outcome = _slow_outcome(poller=2000.0, mq_bridge=900.0, ceiling=1900.0)
    assert outcome.met is True
    assert "ceiling" not in outcome.measured
