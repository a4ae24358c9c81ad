"""Issue 16's targets (and issue 8's two against the boto3 loops, still meaningful), each from one
run, checked against the rows of that run."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from benchmarks.model import CEILING, FAST, KAFKA, REMOTE, SLOW, Latency, RssRun, StartRun, Throughput

__all__ = ["START_CPU_S", "START_FIRST_EVENT_S", "Outcome", "evaluate", "find", "poller_default"]


START_FIRST_EVENT_S = 1.0   # exec -> first event at the sink, median of the runs
START_CPU_S = 0.5           # CPU of the whole process tree by then, median of the runs


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


def _rate_at_least(target: str, rows: Sequence[Throughput], scenario: str, other: str, bar: float) -> Outcome:
    """A rate target: ``bar`` times ``other``'s rate. A miss says so when that rate is above the
    boto3 ceiling of the same run (LocalStack's pace then: receive and delete, nothing delivered),
    where no contender could have reached it; it is still a miss."""
    outcome = _compare(target, rows, scenario, other, _rate, lambda x: x >= bar, "msg/s")
    theirs, ceiling = find(rows, scenario, other), find(rows, CEILING, "ceiling")
    if outcome.met is not False or theirs is None or ceiling is None:
        return outcome
    needed = theirs.msg_per_s * bar
    if needed <= ceiling.msg_per_s:
        return outcome
    return replace(outcome, measured=f"{outcome.measured}; the bar, {needed:,.0f} msg/s, is above "
                                     f"this run's boto3 ceiling ({ceiling.msg_per_s:,.0f} msg/s)")


def _rate(row: Throughput) -> float:
    return row.msg_per_s


def _cpu(row: Throughput) -> float:
    return row.cpu_us_per_msg


def evaluate(rows: Sequence[Throughput], rss: RssRun | None, *, latency: Sequence[Latency] = (),
             start: Sequence[StartRun] = (), stall_target_s: float = 60.0) -> list[Outcome]:
    return [
        _rate_at_least("Fast sink, defaults: rate >= 1.0x mq-bridge", rows, FAST, "mq-bridge", 1.0),
        _compare("Fast sink, defaults: CPU/msg <= 1.0x mq-bridge", rows, FAST, "mq-bridge", _cpu,
                 lambda x: x <= 1.0, "us/msg"),
        _rate_at_least("Kafka, defaults: rate >= 1.0x mq-bridge", rows, KAFKA, "mq-bridge", 1.0),
        _compare("Kafka, defaults: CPU/msg <= 1.0x mq-bridge", rows, KAFKA, "mq-bridge", _cpu,
                 lambda x: x <= 1.0, "us/msg"),
        *_start(start),
        _rate_at_least("Kept: 20 ms subscriber, rate >= 2x mq-bridge", rows, SLOW, "mq-bridge", 2.0),
        _remote(rows),
        _rss(rss, stall_target_s),
        _latency(latency),
        _compare("Issue 8: rate >= 10x the naive loop", rows, FAST, "naive", _rate, lambda x: x >= 10.0, "msg/s"),
        _compare("Issue 8: rate >= 3x the good boto3 loop", rows, FAST, "good", _rate, lambda x: x >= 3.0, "msg/s"),
    ]


def _start(start: Sequence[StartRun]) -> list[Outcome]:
    first = f"Start: first event within {START_FIRST_EVENT_S:.1f} s of exec (median)"
    cpu = f"Start: <= {START_CPU_S:.1f} s CPU, whole process tree, by then (median)"
    mine = next((r for r in start if r.family == "poller" and r.ok), None)
    if mine is None:
        return [Outcome(first, "not measured", None), Outcome(cpu, "not measured", None)]
    theirs = next((r for r in start if r.family == "mq-bridge" and r.ok), None)
    peer_first = f"; mq-bridge {theirs.first_event_median:.2f} s" if theirs else ""
    peer_cpu = f"; mq-bridge {theirs.cpu_median:.2f} s" if theirs else ""
    return [
        Outcome(first, f"{mine.first_event_median:.2f} s ({_spread(mine.first_event_s)} over "
                       f"{len(mine.first_event_s)} runs{peer_first})", mine.first_event_median <= START_FIRST_EVENT_S),
        Outcome(cpu, f"{mine.cpu_median:.2f} s ({_spread(mine.cpu_s)}{peer_cpu})", mine.cpu_median <= START_CPU_S),
    ]


def _spread(values: Sequence[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}"


def _latency(latency: Sequence[Latency]) -> Outcome:
    target = "Kept: latency p99 no worse than mq-bridge's (steady load, fast sink)"
    mine = next((r for r in latency if r.contender.startswith("poller") and not r.error), None)
    theirs = next((r for r in latency if r.contender == "mq-bridge" and not r.error), None)
    if mine is None or theirs is None:
        return Outcome(target, "not measured", None)
    measured = f"{mine.p99_ms:.2f} vs {theirs.p99_ms:.2f} ms (p50 {mine.p50_ms:.2f} vs {theirs.p50_ms:.2f})"
    return Outcome(target, measured, mine.p99_ms <= theirs.p99_ms)


def _remote(rows: Sequence[Throughput]) -> Outcome:
    target = "Kept: SQS 20 ms away, defaults keep >= 0.8 of their direct rate"
    direct, remote = poller_default(rows, FAST), poller_default(rows, REMOTE)
    if direct is None or remote is None:
        return Outcome(target, "not measured", None)
    ratio = _ratio(remote.msg_per_s, direct.msg_per_s)
    return Outcome(target, f"{ratio:.3f} ({remote.msg_per_s:,.0f} vs {direct.msg_per_s:,.0f} msg/s)", ratio >= 0.8)


def _rss(rss: RssRun | None, stall_target_s: float) -> Outcome:
    target = f"Kept: RSS flat (within 10%) over {stall_target_s:.0f} s of a stalled sink"
    if rss is None or rss.error or not rss.samples:
        return Outcome(target, "not measured" if rss is None or not rss.error else f"failed: {rss.error}", None)
    change = (rss.end - rss.start) / rss.start if rss.start else 0.0
    measured = (f"{rss.start / 1e6:.1f} -> {rss.end / 1e6:.1f} MB ({change:+.1%}), peak {rss.peak / 1e6:.1f} MB "
                f"over {rss.seconds:.0f} s")
    if rss.seconds < stall_target_s:
        measured += f" (a {rss.seconds:.0f} s window: quick run)"
    return Outcome(target, measured, rss.flat)
