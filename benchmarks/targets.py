"""Issue 8's targets, each a ratio from one run, checked against the rows of that run."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from benchmarks.model import FAST, KAFKA, REMOTE, SLOW, RssRun, Throughput

__all__ = ["Outcome", "evaluate", "find", "poller_default"]


@dataclass(frozen=True, slots=True)
class Outcome:
    target: str
    measured: str
    met: bool | None          # None: not measured in this run (a row missing or failed)


def find(rows: Sequence[Throughput], scenario: str, family: str) -> Throughput | None:
    """The first good row of ``family`` in ``scenario`` (for the poller: its defaults row)."""
    for row in rows:
        defaults = family != "poller" or row.contender.startswith("poller defaults")
        if row.scenario == scenario and row.family == family and row.ok and defaults:
            return row
    return None


def poller_default(rows: Sequence[Throughput], scenario: str) -> Throughput | None:
    return find(rows, scenario, "poller")


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("inf")


def _compare(target: str, rows: Sequence[Throughput], scenario: str, other: str,
             measure: Callable[[Throughput], float], ok: Callable[[float], bool], what: str,
             other_scenario: str | None = None) -> Outcome:
    mine = poller_default(rows, scenario)
    theirs = find(rows, other_scenario or scenario, other)
    if mine is None or theirs is None:
        return Outcome(target, "not measured", None)
    ratio = _ratio(measure(mine), measure(theirs))
    return Outcome(target, f"{ratio:.3f}x ({measure(mine):,.1f} vs {measure(theirs):,.1f} {what})", ok(ratio))


def _rate(row: Throughput) -> float:
    return row.msg_per_s


def _cpu(row: Throughput) -> float:
    return row.cpu_us_per_msg


def evaluate(rows: Sequence[Throughput], rss: RssRun | None, *, stall_target_s: float = 60.0) -> list[Outcome]:
    out = [
        _compare("Fast sink: rate >= 1.0x mq-bridge", rows, FAST, "mq-bridge", _rate, lambda x: x >= 1.0, "msg/s"),
        _compare("Fast sink: CPU/msg <= 1.0x mq-bridge", rows, FAST, "mq-bridge", _cpu, lambda x: x <= 1.0, "us/msg"),
        _never_above(rows),
        _compare("20 ms subscriber: rate >= 2x mq-bridge (defaults)", rows, SLOW, "mq-bridge", _rate,
                 lambda x: x >= 2.0, "msg/s"),
        _compare("Kafka: rate >= 1.0x mq-bridge", rows, KAFKA, "mq-bridge", _rate, lambda x: x >= 1.0, "msg/s"),
        _compare("Kafka: CPU/msg <= 1.0x mq-bridge", rows, KAFKA, "mq-bridge", _cpu, lambda x: x <= 1.0, "us/msg"),
        _remote(rows),
        _compare("Rate >= 10x the naive loop", rows, FAST, "naive", _rate, lambda x: x >= 10.0, "msg/s"),
        _compare("Rate >= 3x the good boto3 loop", rows, FAST, "good", _rate, lambda x: x >= 3.0, "msg/s"),
        _rss(rss, stall_target_s),
    ]
    return out


def _never_above(rows: Sequence[Throughput]) -> Outcome:
    target = "Fast sink: CPU/msg never above 1.5x mq-bridge (every poller row)"
    theirs = find(rows, FAST, "mq-bridge")
    mine = [r for r in rows if r.scenario == FAST and r.family == "poller" and r.ok]
    if theirs is None or not mine:
        return Outcome(target, "not measured", None)
    worst = max(mine, key=lambda r: r.cpu_us_per_msg)
    ratio = _ratio(worst.cpu_us_per_msg, theirs.cpu_us_per_msg)
    return Outcome(target, f"worst {ratio:.3f}x ({worst.contender})", ratio <= 1.5)


def _remote(rows: Sequence[Throughput]) -> Outcome:
    target = "SQS 20 ms away: defaults keep >= 0.8 of their direct rate"
    direct, remote = poller_default(rows, FAST), poller_default(rows, REMOTE)
    if direct is None or remote is None:
        return Outcome(target, "not measured", None)
    ratio = _ratio(remote.msg_per_s, direct.msg_per_s)
    return Outcome(target, f"{ratio:.3f} ({remote.msg_per_s:,.0f} vs {direct.msg_per_s:,.0f} msg/s)", ratio >= 0.8)


def _rss(rss: RssRun | None, stall_target_s: float) -> Outcome:
    target = f"RSS flat (within 10%) over {stall_target_s:.0f} s of a stalled sink"
    if rss is None or rss.error or not rss.samples:
        return Outcome(target, "not measured" if rss is None or not rss.error else f"failed: {rss.error}", None)
    change = (rss.end - rss.start) / rss.start if rss.start else 0.0
    measured = (f"{rss.start / 1e6:.1f} -> {rss.end / 1e6:.1f} MB ({change:+.1%}), peak {rss.peak / 1e6:.1f} MB "
                f"over {rss.seconds:.0f} s")
    if rss.seconds < stall_target_s:
        measured += f" (a {rss.seconds:.0f} s window: quick run)"
    return Outcome(target, measured, rss.flat)
