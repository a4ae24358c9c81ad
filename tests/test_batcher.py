"""poller/batcher.py: batches of at most 10, linger, close flushes all, a failing flush is survived."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import pytest

from poller.batcher import Batcher


class Recorder:
    """make_flush for a Batcher: records every batch with the thread that flushed it."""

    def __init__(self, fail_first: int = 0, delay: float = 0.0) -> None:
        self.lock = threading.Lock()
        self.batches: list[tuple[str, list[int], float]] = []
        self.made_in: list[str] = []
        self.fail_first = fail_first
        self.delay = delay
        self.calls = 0
        self.flushed = threading.Condition(self.lock)

    def __call__(self) -> Callable[[Sequence[int]], None]:
        with self.lock:
            self.made_in.append(threading.current_thread().name)

        def flush(items: Sequence[int]) -> None:
            if self.delay:
                time.sleep(self.delay)
            with self.lock:
                self.calls += 1
                failing = self.calls <= self.fail_first
                if not failing:
                    self.batches.append((threading.current_thread().name, list(items), time.monotonic()))
                self.flushed.notify_all()
            if failing:
                raise RuntimeError("flush failed (test)")

        return flush

    def items(self) -> list[int]:
        with self.lock:
            return [i for _, batch, _ in self.batches for i in batch]

    def wait_for(self, n_items: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.lock:
            while sum(len(b) for _, b, _ in self.batches) < n_items:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.flushed.wait(left)
            return True


@pytest.fixture
def batchers() -> list[Batcher[int]]:
    made: list[Batcher[int]] = []
    yield made
    for b in made:
        b.close(2.0)


def start(batchers: list[Batcher[int]], recorder: Recorder, **kwargs: object) -> Batcher[int]:
    batcher: Batcher[int] = Batcher("test", recorder, **kwargs)  # type: ignore[arg-type]
    batchers.append(batcher)
    batcher.start()
    return batcher


@pytest.mark.parametrize("threads", [1, 3])
def test_batches_never_exceed_ten(batchers: list[Batcher[int]], threads: int) -> None:
    recorder = Recorder()
    batcher = start(batchers, recorder, threads=threads, linger=0.05)
    for i in range(257):
        batcher.add(i)
    assert batcher.close(5.0)
    sizes = [len(b) for _, b, _ in recorder.batches]
    assert max(sizes) <= 10
    assert sorted(recorder.items()) == list(range(257))  # each exactly once
    assert sum(1 for s in sizes if s == 10) >= 15  # a busy batcher does fill its batches


def test_make_flush_once_per_thread_in_that_thread(batchers: list[Batcher[int]]) -> None:
    recorder = Recorder()
    batcher = start(batchers, recorder, threads=3)
    assert batcher.close(2.0)
    assert sorted(recorder.made_in) == ["test-0", "test-1", "test-2"]


def test_custom_max_batch(batchers: list[Batcher[int]]) -> None:
    recorder = Recorder()
    batcher = start(batchers, recorder, max_batch=3, linger=0.05)
    for i in range(20):
        batcher.add(i)
    assert batcher.close(2.0)
    assert max(len(b) for _, b, _ in recorder.batches) <= 3
    assert sorted(recorder.items()) == list(range(20))


def test_lone_item_is_flushed_after_linger(batchers: list[Batcher[int]]) -> None:
    recorder = Recorder()
    batcher = start(batchers, recorder, linger=0.3)
    time.sleep(0.1)  # the thread is waiting
    added = time.monotonic()
    batcher.add(42)
    assert recorder.wait_for(1, timeout=3.0), "a lone item was never flushed"
    _, batch, at = recorder.batches[0]
    assert batch == [42]
    assert 0.25 <= at - added < 1.5, at - added  # waited for company, then went alone


def test_full_batch_does_not_wait_for_linger(batchers: list[Batcher[int]]) -> None:
    recorder = Recorder()
    batcher = start(batchers, recorder, linger=5.0)
    time.sleep(0.05)
    added = time.monotonic()
    for i in range(10):
        batcher.add(i)
    assert recorder.wait_for(10, timeout=2.0)
    assert recorder.batches[0][2] - added < 1.0


def test_close_flushes_everything_added_without_waiting_for_linger(batchers: list[Batcher[int]]) -> None:
    recorder = Recorder()
    batcher = start(batchers, recorder, threads=2, linger=10.0)
    for i in range(23):
        batcher.add(i)
    started = time.monotonic()
    assert batcher.close(5.0) is True
    assert time.monotonic() - started < 2.0
    assert sorted(recorder.items()) == list(range(23))


def test_close_with_a_lone_pending_item(batchers: list[Batcher[int]]) -> None:
    recorder = Recorder()
    batcher = start(batchers, recorder, linger=10.0)
    batcher.add(7)
    time.sleep(0.05)  # the thread holds it, lingering
    assert batcher.close(2.0)
    assert recorder.items() == [7]


def test_close_reports_a_flush_that_does_not_finish(batchers: list[Batcher[int]]) -> None:
    recorder = Recorder(delay=1.0)
    batcher = start(batchers, recorder, linger=0.01)
    batcher.add(1)
    time.sleep(0.1)  # the flush is under way
    assert batcher.close(0.2) is False


def test_close_without_start() -> None:
    batcher: Batcher[int] = Batcher("never", Recorder())
    assert batcher.close(0.1) is True


def test_flush_that_raises_does_not_kill_the_thread(batchers: list[Batcher[int]],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    recorder = Recorder(fail_first=2)
    batcher = start(batchers, recorder, threads=1, linger=0.01)
    batcher.add(1)
    batcher.add(2)
    time.sleep(0.2)
    batcher.add(3)
    time.sleep(0.2)
    batcher.add(4)
    assert recorder.wait_for(1, timeout=2.0)
    assert all(t.is_alive() for t in batcher._threads)
    assert batcher.close(2.0)
    assert recorder.calls >= 3
    assert 4 in recorder.items()
    assert "flushing" in caplog.text and "failed" in caplog.text
