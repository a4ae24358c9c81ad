"""channels/reports.py: reports made on a channel's own thread (Kafka's poll thread) reach the loop that published."""

from __future__ import annotations

import asyncio
import threading

from channels.base import Message, Outcome
from channels.reports import LoopReports


def test_reports_from_a_thread_run_on_the_loop_in_order_with_one_wakeup_per_batch() -> None:
    async def main() -> tuple[list[tuple[str, Outcome, int]], int]:
        loop = asyncio.get_running_loop()
        reports = LoopReports()
        reports.bind()
        seen: list[tuple[str, Outcome, int]] = []
        wakeups = 0
        original = loop.call_soon_threadsafe

        def counting(*args: object, **kwargs: object) -> asyncio.Handle:
            nonlocal wakeups
            wakeups += 1
            return original(*args, **kwargs)  # type: ignore[arg-type]

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]

        def report(message: Message, outcome: Outcome, reason: str = "", retry_after: float = 0.0) -> None:
            seen.append((message.id, outcome, threading.get_ident()))

        messages = [Message(id=str(i), body="", ack_id=str(i)) for i in range(500)]

        def poll_thread() -> None:
            for message in messages:
                reports.send(report, message, Outcome.ACK, "")

        thread = threading.Thread(target=poll_thread)
        thread.start()
        await asyncio.to_thread(thread.join, 5)
        for _ in range(100):
            if len(seen) == len(messages):
                break
            await asyncio.sleep(0.01)
        return seen, wakeups

    seen, wakeups = asyncio.run(main())
    assert [s[0] for s in seen] == [str(i) for i in range(500)]
    assert {s[2] for s in seen} == {threading.get_ident()}  # all on the loop's thread
    assert 1 <= wakeups < 500


def test_without_a_loop_reports_are_made_on_the_calling_thread() -> None:
    reports = LoopReports()
    reports.bind()  # no running loop: nothing to bring reports to
    seen: list[str] = []
    reports.send(lambda m, o, r="", a=0.0: seen.append(m.id), Message(id="1", body="", ack_id="1"),
                 Outcome.RETRY, "closed")
    assert seen == ["1"]


def test_a_report_after_the_loop_closed_is_still_made() -> None:
    async def bind() -> LoopReports:
        reports = LoopReports()
        reports.bind()
        return reports

    reports = asyncio.run(bind())  # the loop is closed now
    seen: list[str] = []
    thread = threading.Thread(target=reports.send, args=(
        lambda m, o, r="", a=0.0: seen.append(m.id), Message(id="1", body="", ack_id="1"), Outcome.RETRY, "x"))
    thread.start()
    thread.join(5)
    assert seen == ["1"]


def test_reports_waiting_for_a_flush_that_never_ran_are_made_once_the_loop_has_closed() -> None:
    """A flush scheduled on a loop that closed before running it left the outbox full, and every
    later report waited behind it for ever."""
    seen: list[str] = []

    def report(m: Message, o: Outcome, r: str = "", a: float = 0.0) -> None:
        seen.append(m.id)

    async def bind() -> LoopReports:
        reports = LoopReports()
        reports.bind()
        return reports

    loop = asyncio.new_event_loop()
    reports = loop.run_until_complete(bind())
    thread = threading.Thread(target=reports.send, args=(report, Message(id="1", body="", ack_id="1"),
                                                          Outcome.RETRY, "x"))
    thread.start()
    thread.join(5)
    loop.close()  # the flush it scheduled never ran
    assert seen == []
    thread = threading.Thread(target=reports.send, args=(report, Message(id="2", body="", ack_id="2"),
                                                          Outcome.RETRY, "x"))
    thread.start()
    thread.join(5)
    assert seen == ["1", "2"]
