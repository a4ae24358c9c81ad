"""poller.visibility.VisibilityLanes with a recording SQS client: batches, order, and that an
extension never undoes a return."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any

from poller.sqs import BatchFailure, SqsError
from poller.stats import Counters
from poller.visibility import VisibilityLanes
from poller.watchdog import Watchdog
from support import wait_until


class RecordingClient:
    def __init__(self, fail: dict[str, str] | None = None, raise_first: int = 0) -> None:
        self.calls: list[list[tuple[str, int]]] = []
        self._fail = fail or {}
        self._raise = raise_first
        self.lock = threading.Lock()

    def change_visibility_batch(self, entries: Iterable[tuple[str, int]]) -> list[BatchFailure]:
        entries = list(entries)
        with self.lock:
            if self._raise:
                self._raise -= 1
                raise SqsError("Throttling", "slow down", retryable=True)
            self.calls.append(entries)
        return [BatchFailure(i, self._fail[h], "", False) for i, (h, _) in enumerate(entries) if h in self._fail]

    def close(self) -> None:
        pass


class Rig:
    def __init__(self, lanes: int = 2, held: set[str] | None = None, client: RecordingClient | None = None) -> None:
        self.client = client or RecordingClient()
        self.held = held if held is not None else set()
        self.failed: list[str] = []
        self.lost: list[str] = []
        self.counters = Counters()
        self.lanes = VisibilityLanes(
            lambda: self.client,  # type: ignore[arg-type,return-value]
            lanes=lanes, still_held=lambda hs: {h for h in hs if h in self.held},
            extension_failed=self.failed.extend, visibility_lost=self.lost.extend,
            counters=self.counters, watchdog=Watchdog(), linger=0.05,
        )
        self.lanes.start()

    def sent(self) -> list[tuple[str, int]]:
        with self.client.lock:
            return [entry for call in self.client.calls for entry in call]


def test_batches_of_at_most_ten_and_everything_sent_by_close() -> None:
    held = {f"h{i}" for i in range(95)}
    rig = Rig(lanes=3, held=held)
    rig.lanes.extend(sorted(held), 30)
    assert rig.lanes.close(5.0)
    assert sorted(h for h, _ in rig.sent()) == sorted(held)
    assert all(len(call) <= 10 for call in rig.client.calls)
    assert rig.counters.get("extended") == 95


def test_an_extension_of_a_message_no_longer_held_is_dropped() -> None:
    rig = Rig(lanes=1, held={"kept"})
    rig.lanes.extend(["kept", "returned-meanwhile"], 30)
    assert rig.lanes.close(5.0)
    assert rig.sent() == [("kept", 30)]


def test_a_return_wins_over_an_extension_asked_before_it() -> None:
    # The message is still held when both are queued; the return is asked last.
    rig = Rig(lanes=4, held={f"h{i}" for i in range(40)})
    handles = [f"h{i}" for i in range(40)]
    rig.lanes.extend(handles, 30)
    rig.held.clear()  # the worker released them, then asked for the returns
    rig.lanes.give_back(handles, 0)
    assert rig.lanes.close(5.0)
    last: dict[str, int] = {}
    for handle, timeout in rig.sent():
        last[handle] = timeout
    assert last == {h: 0 for h in handles}  # whatever was sent, the last word is the return


def test_a_failed_call_asks_for_the_extension_again_and_never_kills_the_lane() -> None:
    rig = Rig(lanes=1, held={"a", "b"}, client=RecordingClient(raise_first=1))
    rig.lanes.extend(["a", "b"], 30)
    wait_until(lambda: sorted(rig.failed) == ["a", "b"], 5, "the failure to be reported")
    rig.lanes.extend(["a"], 30)  # the extender asks again on its next tick
    assert rig.lanes.close(5.0)
    assert rig.sent() == [("a", 30)]


def test_a_handle_already_visible_again_is_counted_and_not_extended_again() -> None:
    client = RecordingClient(fail={"gone": "ReceiptHandleIsInvalid", "busy": "InternalError"})
    rig = Rig(lanes=1, held={"gone", "busy", "ok"}, client=client)
    rig.lanes.extend(["gone", "busy", "ok"], 30)
    assert rig.lanes.close(5.0)
    assert rig.lost == ["gone"] and rig.failed == ["busy"]
    assert rig.counters.get("expired") == 1 and rig.counters.get("extended") == 1


def test_close_returns_in_time_when_sqs_hangs() -> None:
    class Hanging(RecordingClient):
        def change_visibility_batch(self, entries: Iterable[tuple[str, int]]) -> Any:
            time.sleep(30)
            return []

    rig = Rig(lanes=1, held={"a"}, client=Hanging())
    rig.lanes.extend(["a"], 30)
    time.sleep(0.2)
    started = time.monotonic()
    assert rig.lanes.close(0.5) is False
    assert time.monotonic() - started < 5
