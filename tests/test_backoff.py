"""channels/transport/backoff.backoff and poller/backoff.nack_visibility: growth, jitter bounds, cap."""

from __future__ import annotations

import random

import pytest

from channels.transport.backoff import backoff
from poller.backoff import nack_visibility

SQS_MAX_VISIBILITY = 43200  # seconds; ChangeMessageVisibility refuses more


@pytest.mark.parametrize("attempt", range(1, 12))
def test_backoff_within_jitter_of_doubling(attempt: int) -> None:
    rng = random.Random(attempt)
    nominal = min(30.0, 0.5 * 2 ** (attempt - 1))
    samples = [backoff(attempt, base=0.5, cap=30.0, rng=rng) for _ in range(500)]
    upper = min(30.0, nominal * 1.2)  # the cap is hard: jitter never lifts a delay above it
    assert all(nominal * 0.8 - 1e-9 <= s <= upper + 1e-9 for s in samples), (min(samples), max(samples))
    # the jitter is real: not always the same value, spread on both sides (below the cap)
    assert min(samples) < nominal
    if nominal < 30.0:
        assert max(samples) > nominal


def test_backoff_without_jitter_is_exact() -> None:
    assert [backoff(n, base=0.2, cap=5.0, jitter=0.0) for n in range(1, 8)] == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]


@pytest.mark.parametrize("attempt", [0, -1, -100])
def test_backoff_attempts_below_one_count_as_one(attempt: int) -> None:
    assert backoff(attempt, base=0.5, cap=30.0, jitter=0.0) == 0.5


def test_backoff_zero_base_is_zero() -> None:
    assert backoff(5, base=0.0, cap=10.0) == 0.0


def test_backoff_never_negative() -> None:
    rng = random.Random(7)
    assert all(backoff(n, base=1.0, cap=10.0, jitter=1.0, rng=rng) >= 0.0 for n in range(1, 20) for _ in range(50))


@pytest.mark.parametrize("attempt", [20, 60, 1000])
def test_backoff_capped_for_many_attempts(attempt: int) -> None:
    rng = random.Random(attempt)
    samples = [backoff(attempt, base=0.5, cap=20.0, rng=rng) for _ in range(200)]
    assert all(16.0 - 1e-9 <= s <= 24.0 + 1e-9 for s in samples)


@pytest.mark.parametrize("attempt", [1025, 10_000, 10**6])
def test_backoff_huge_attempt_is_the_cap(attempt: int) -> None:
    assert 16.0 <= backoff(attempt, base=0.5, cap=20.0) <= 24.0


# -- nack_visibility ----------------------------------------------------------------------------


@pytest.mark.parametrize("receive_count", range(1, 12))
def test_nack_visibility_grows_with_receive_count(receive_count: int) -> None:
    nominal = min(300.0, 2.0 * 2 ** (receive_count - 1))
    for _ in range(300):
        v = nack_visibility(receive_count, base=2.0, cap=300.0)
        assert isinstance(v, int)
        # whole seconds: the jittered value rounded
        assert round(nominal * 0.8) - 1 <= v <= round(nominal * 1.2) + 1, (receive_count, v)


@pytest.mark.parametrize("receive_count", [0, -3])
def test_nack_visibility_counts_below_one_as_first(receive_count: int) -> None:
    assert all(1 <= nack_visibility(receive_count, base=2.0, cap=300.0) <= 3 for _ in range(100))


def test_nack_visibility_zero_base_means_at_once() -> None:
    assert {nack_visibility(n, base=0.0, cap=300.0) for n in range(1, 30)} == {0}


@pytest.mark.parametrize("cap", [300.0, float(SQS_MAX_VISIBILITY)])
def test_nack_visibility_never_exceeds_the_cap(cap: float) -> None:
    values = [nack_visibility(n, base=2.0, cap=cap) for n in range(1, 40) for _ in range(50)]
    assert max(values) <= cap
    assert max(values) <= SQS_MAX_VISIBILITY


def test_nack_visibility_huge_receive_count() -> None:
    assert 0 < nack_visibility(5000, base=2.0, cap=300.0) <= 360
