"""poller.visibility.VisibilityLanes and poller.deleter.Deleter with a recording SQS client, on a
real event loop: batches, order, an extension never undoing a return, retries, deadlines."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from poller.deleter import Deleter
from poller.sqs import BatchFailure, SqsError
from poller.stats import Counters
from poller.visibility import VisibilityLanes


def on_loop(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


class RecordingClient:
    """What the lanes and the deleter need of ``SqsClient``; calls are recorded in order."""

    def __init__(self, fail: dict[str, str] | None = None, raise_first: int = 0, hang: bool = False) -> None:
        self.calls: list[list[tuple[str, int]]] = []
        self.deletes: list[list[str]] = []
        self._fail = fail or {}
        self._raise = raise_first
        self._hang = hang

    async def change_visibility_batch(self, entries: Iterable[tuple[str, int]]) -> list[BatchFailure]:
        entries = list(entries)
        await self._maybe_fail()
        self.calls.append(entries)
        return [BatchFailure(i, self._fail[h], "", False) for i, (h, _) in enumerate(entries) if h in self._fail]

    async def delete_batch(self, handles: Sequence[str]) -> list[BatchFailure]:
        await self._maybe_fail()
        self.deletes.append(list(handles))
        return [BatchFailure(i, self._fail[h], "", self._fail[h] == "Invalid") for i, h in enumerate(handles)
                if h in self._fail]

    async def _maybe_fail(self) -> None:
        await asyncio.sleep(0.001)
        if self._hang:
            await asyncio.sleep(3600)
        if self._raise:
            self._raise -= 1
            raise SqsError("Throttling", "slow down", retryable=True)

    def sent(self) -> list[tuple[str, int]]:
        return [entry for call in self.calls for entry in call]


def items(handles: Iterable[str], group: str | None = None) -> list[tuple[str, str | None]]:
    return [(h, group) for h in handles]


class Lanes:
    def __init__(self, lanes: int = 2, held: set[str] | None = None, client: RecordingClient | None = None) -> None:
        self.client = client or RecordingClient()
        self.held = held if held is not None else set()
        self.failed: list[str] = []
        self.lost: list[str] = []
        self.counters = Counters()
        self.lanes = VisibilityLanes(
            self.client,  # type: ignore[arg-type]
            lanes=lanes, still_held=lambda hs: {h for h in hs if h in self.held},
            extension_failed=self.failed.extend, visibility_lost=self.lost.extend,
            counters=self.counters, linger=0.01,
        )


@on_loop
async def test_batches_of_at_most_ten_and_everything_sent_by_close() -> None:
    held = {f"h{i}" for i in range(95)}
    rig = Lanes(lanes=3, held=held)
    rig.lanes.extend(items(sorted(held)), 30)
    assert await rig.lanes.close(5.0)
    assert sorted(h for h, _ in rig.client.sent()) == sorted(held)
    assert all(len(call) <= 10 for call in rig.client.calls)
    assert rig.counters.get("extended") == 95


@on_loop
async def test_an_extension_of_a_message_no_longer_held_is_dropped() -> None:
    rig = Lanes(lanes=1, held={"kept"})
    rig.lanes.extend(items(["kept", "returned-meanwhile"]), 30)
    assert await rig.lanes.close(5.0)
    assert rig.client.sent() == [("kept", 30)]


@on_loop
async def test_a_return_wins_over_an_extension_asked_before_it() -> None:
    rig = Lanes(lanes=4, held={f"h{i}" for i in range(40)})
    handles = [f"h{i}" for i in range(40)]
    rig.lanes.extend(items(handles), 30)
    await asyncio.sleep(0.005)  # some extension batches are on their way
    rig.held.clear()  # the worker released them, then asked for the returns
    rig.lanes.give_back(items(handles), 0)
    assert await rig.lanes.close(5.0)
    last: dict[str, int] = {}
    for handle, timeout in rig.client.sent():
        last[handle] = timeout
    assert last == {h: 0 for h in handles}  # whatever was sent, the last word is the return


@on_loop
async def test_a_fifo_groups_changes_share_one_lane_and_its_return_goes_head_first() -> None:
    """Every change of a group's messages goes through one lane, in the order asked: the group's
    return is one timeout, head first, and no extension of one of them can land after it (SQS
    frees a group as soon as any of its held messages is visible: a later one visible before
    its head broke FIFO order)."""
    client = RecordingClient()
    groups = {g: [f"{g}-{i}" for i in range(5)] for g in "abcdefgh"}
    rig = Lanes(lanes=8, held={h for hs in groups.values() for h in hs}, client=client)
    lanes_used: dict[str, set[int]] = {}
    add = rig.lanes._add

    def recording_add(change: Any, group: str | None) -> None:
        add(change, group)
        index = next(i for i, lane in enumerate(rig.lanes._lanes) if lane and lane[-1] is change)
        lanes_used.setdefault(change.handle[0], set()).add(index)

    rig.lanes._add = recording_add  # type: ignore[method-assign]
    for group, handles in groups.items():
        rig.lanes.extend(items(handles, group), 30)
    await asyncio.sleep(0.005)
    rig.held.clear()
    for group, handles in groups.items():
        rig.lanes.give_back(items(handles, group), 7)
    assert await rig.lanes.close(5.0)
    assert all(len(used) == 1 for used in lanes_used.values()), lanes_used
    for group, handles in groups.items():
        sent = [(h, t) for call in client.calls for h, t in call if h.startswith(group)]
        assert {h: t for h, t in sent} == {h: 7 for h in handles}  # the return is the last word
        assert [h for h, t in sent if t == 7] == handles  # head first


@on_loop
async def test_an_extension_never_replaces_a_return_of_the_same_message() -> None:
    rig = Lanes(lanes=1, held=set())
    rig.lanes.give_back(items(["a"]), 0)
    rig.held.add("a")  # as if asked again by mistake: the return must stand
    rig.lanes.extend(items(["a"]), 30)
    assert await rig.lanes.close(5.0)
    assert rig.client.sent() == [("a", 0)]


@on_loop
async def test_a_failed_call_asks_for_the_extension_again_and_never_kills_the_lane() -> None:
    rig = Lanes(lanes=1, held={"a", "b"}, client=RecordingClient(raise_first=1))
    rig.lanes.extend(items(["a", "b"]), 30)
    for _ in range(200):
        await asyncio.sleep(0.01)
        if sorted(rig.failed) == ["a", "b"]:
            break
    assert sorted(rig.failed) == ["a", "b"]
    rig.lanes.extend(items(["a"]), 30)  # the extender asks again on its next tick
    assert await rig.lanes.close(5.0)
    assert rig.client.sent() == [("a", 30)]


@on_loop
async def test_a_handle_already_visible_again_is_counted_and_not_extended_again() -> None:
    client = RecordingClient(fail={"gone": "ReceiptHandleIsInvalid", "busy": "InternalError"})
    rig = Lanes(lanes=1, held={"gone", "busy", "ok"}, client=client)
    rig.lanes.extend(items(["gone", "busy", "ok"]), 30)
    assert await rig.lanes.close(5.0)
    assert rig.lost == ["gone"] and rig.failed == ["busy"]
    assert rig.counters.get("expired") == 1 and rig.counters.get("extended") == 1


@on_loop
async def test_close_gives_up_when_sqs_hangs() -> None:
    rig = Lanes(lanes=1, held={"a"}, client=RecordingClient(hang=True))
    rig.lanes.extend(items(["a"]), 30)
    assert await rig.lanes.close(0.3) is False


# -- the deleter ---------------------------------------------------------------------------------


class Deletes:
    def __init__(self, client: RecordingClient | None = None, linger: float = 0.05) -> None:
        self.client = client or RecordingClient()
        self.done: list[str] = []
        self.counters = Counters()
        self.deleter = Deleter(self.client, linger=linger, visibility_timeout=10,  # type: ignore[arg-type]
                               done=self.done.extend, counters=self.counters)


@on_loop
async def test_deletes_go_in_batches_of_ten_or_after_the_linger() -> None:
    rig = Deletes(linger=0.05)
    for i in range(23):
        rig.deleter.add(f"h{i}")
    await asyncio.sleep(0.02)
    assert [len(b) for b in rig.client.deletes] == [10, 10]  # full batches at once
    await asyncio.sleep(0.1)
    assert [len(b) for b in rig.client.deletes] == [10, 10, 3]  # the rest after the linger
    assert sorted(rig.done) == sorted(f"h{i}" for i in range(23))
    assert rig.counters.get("deleted") == 23


@on_loop
async def test_a_failed_delete_call_is_retried_and_failed_entries_too() -> None:
    client = RecordingClient(raise_first=2, fail={"expired": "ReceiptHandleIsInvalid", "bad": "Invalid"})
    rig = Deletes(client, linger=0.0)
    for handle in ("a", "expired", "bad"):
        rig.deleter.add(handle)
    assert await rig.deleter.close(10.0)
    assert rig.client.deletes[-1] == ["a", "expired", "bad"]
    assert rig.counters.get("deleted") == 1 and rig.counters.get("expired") == 1
    assert rig.counters.get("delete_failed") == 1
    assert sorted(rig.done) == ["a", "bad", "expired"]  # the worker stops holding all three


@on_loop
async def test_a_handle_twice_in_a_batch_is_sent_once() -> None:
    rig = Deletes(linger=0.0)
    rig.deleter.add("a")
    rig.deleter.add("a")
    assert await rig.deleter.close(5.0)
    assert rig.client.deletes == [["a"]]


@on_loop
async def test_deleter_close_gives_up_when_sqs_hangs() -> None:
    rig = Deletes(RecordingClient(hang=True), linger=0.0)
    rig.deleter.add("a")
    assert await rig.deleter.close(0.3) is False
    assert rig.done == ["a"]  # cancelled: the worker is told all the same
