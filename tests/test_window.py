"""The receive window (poller.window): --receivers, plus the receives SQS's round trip calls for
at the rate the process receives (Little's law), bounded by --max-receivers."""

from __future__ import annotations

from poller.window import ReceiveWindow


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def feed(window: ReceiveWindow, clock: Clock, *, rate: float, took: float, seconds: float,
         got: int = 10, asked: int = 10) -> None:
    """Receives of ``got`` of ``asked`` each taking ``took``, at ``rate`` messages a second."""
    step = got / rate if got else 0.05
    end = clock.now + seconds
    while clock.now < end:
        clock.now += step
        window.received(got, asked, took)


def test_it_starts_at_receivers() -> None:
    window = ReceiveWindow(8, 16, 10, Clock())
    assert window.limit == 8 and window.round_trip is None


def test_a_far_queue_with_a_backlog_gets_a_receive_per_batch_its_round_trip_carries() -> None:
    """20 ms away at 2,500 msg/s: 2,500 x 0.020 / 10 = 5 receives carry the flow, besides the 8."""
    clock = Clock()
    window = ReceiveWindow(8, 16, 10, clock)
    feed(window, clock, rate=2500, took=0.020, seconds=3)
    assert window.round_trip == 0.020
    assert window.limit == 13


def test_a_near_queue_gets_no_more_than_one_more() -> None:
    """A millisecond away the round trip carries a batch at most: the 8 stay about 8, and a
    saturated server is not sent needless requests to queue."""
    clock = Clock()
    window = ReceiveWindow(8, 16, 10, clock)
    feed(window, clock, rate=2800, took=0.002, seconds=3)
    assert window.limit == 9


def test_the_round_trip_is_the_least_full_receive_not_the_queueing_one() -> None:
    """Receives that waited in the server's queue do not raise the round trip: the least one is
    the wire's time."""
    clock = Clock()
    window = ReceiveWindow(8, 16, 10, clock)
    feed(window, clock, rate=2000, took=0.020, seconds=0.1)
    feed(window, clock, rate=2000, took=0.080, seconds=3)
    assert window.round_trip == 0.020
    assert window.limit == 12  # 8 + 2,000 x 0.020 / 10


def test_short_receives_say_nothing_of_the_round_trip() -> None:
    """A receive that came back short may have waited in its long poll for what it got: without
    a backlog the window stays at --receivers."""
    clock = Clock()
    window = ReceiveWindow(8, 16, 10, clock)
    feed(window, clock, rate=300, took=0.5, seconds=5, got=3)
    assert window.round_trip is None and window.limit == 8


def test_the_ceiling_bounds_it() -> None:
    clock = Clock()
    window = ReceiveWindow(8, 10, 10, clock)
    feed(window, clock, rate=5000, took=0.050, seconds=3)
    assert window.limit == 10


def test_a_ceiling_below_the_floor_keeps_the_count_fixed() -> None:
    clock = Clock()
    window = ReceiveWindow(8, 4, 10, clock)
    feed(window, clock, rate=5000, took=0.050, seconds=3)
    assert window.ceiling == 8 and window.limit == 8


def test_it_falls_back_once_the_backlog_is_gone() -> None:
    """The rate falls with the backlog: the extra receives go back within a second; and the
    round trip ages out 10-20 s after the last full receive."""
    clock = Clock()
    window = ReceiveWindow(8, 16, 10, clock)
    feed(window, clock, rate=2500, took=0.020, seconds=3)
    assert window.limit == 13
    feed(window, clock, rate=20, took=20.0, seconds=2, got=0)  # empty long polls
    assert window.limit == 8
    feed(window, clock, rate=20, took=20.0, seconds=21, got=0)
    assert window.round_trip is None


def test_an_idle_gap_ages_both_spans_out() -> None:
    clock = Clock()
    window = ReceiveWindow(8, 16, 10, clock)
    feed(window, clock, rate=2500, took=0.020, seconds=1)
    clock.now += 45  # long polls that brought nothing and reported nothing (a stopped poller)
    window.received(0, 10, 20.0)
    assert window.round_trip is None
