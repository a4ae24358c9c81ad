"""poller.circuit.Circuit and poller.watchdog.Watchdog: pure logic, a chosen clock."""

from __future__ import annotations

import pytest

from poller.circuit import Circuit
from poller.watchdog import Watchdog


def test_opens_after_threshold_failures_in_a_row() -> None:
    circuit = Circuit(threshold=3)
    assert not circuit.failure(0.0, "refused")
    assert not circuit.failure(0.0, "refused")
    assert circuit.failure(0.0, "refused")
    assert circuit.is_open and circuit.last_failure == "refused"
    assert not circuit.failure(0.0, "refused")  # opened once, not again


def test_a_success_resets_the_count() -> None:
    circuit = Circuit(threshold=3)
    for _ in range(10):
        circuit.failure(0.0, "503")
        circuit.failure(0.0, "503")
        assert not circuit.success()
    assert not circuit.is_open


def test_one_probe_at_a_time_after_a_growing_backoff() -> None:
    circuit = Circuit(threshold=1, probe_base=1.0, probe_cap=8.0)
    circuit.failure(100.0, "down")
    assert not circuit.take_probe(100.0)  # the first probe waits ~1 s
    assert circuit.take_probe(102.0)
    assert not circuit.take_probe(1000.0)  # one is out already
    gaps = []
    now = 102.0
    for _ in range(6):
        circuit.probe_failed(now)
        gaps.append(circuit.next_probe_at - now)
        now = circuit.next_probe_at
        assert circuit.take_probe(now)
    assert gaps[0] < gaps[2]  # grows (jitter is 20%: 2 s and 8 s cannot cross)
    assert max(gaps) <= 8.0 + 1e-9 and gaps[-1] >= 8.0 * 0.8  # reaches the cap ((now + 8) - now may be 8 + 1 ulp)
    assert circuit.success()  # the probe went through: closed
    assert not circuit.is_open and not circuit.take_probe(now + 100)


def test_retry_after_holds_the_next_probe_back() -> None:
    circuit = Circuit(threshold=1, probe_base=1.0, probe_cap=8.0)
    circuit.failure(0.0, "429", wait=60.0)
    assert not circuit.take_probe(30.0)
    assert circuit.take_probe(60.0)
    circuit.probe_failed(60.0, wait=120.0)
    assert not circuit.take_probe(170.0) and circuit.take_probe(180.0)


def test_threshold_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Circuit(threshold=0)


def test_watchdog_names_the_late_loops_only() -> None:
    now = [0.0]
    dog = Watchdog(clock=lambda: now[0])
    beat_a = dog.register("receiver-0", 10)
    beat_b = dog.register("deleter-0", 60)
    now[0] = 30.0
    beat_b()
    late = dog.late()
    assert len(late) == 1 and late[0].startswith("receiver-0 silent for 30s")
    beat_a()
    assert dog.late() == []
    dog.unregister("receiver-0")
    beat_a()  # a beat after unregistering is ignored
    now[0] = 1000.0
    assert [line.split()[0] for line in dog.late()] == ["deleter-0"]
