"""The conformance kit (``channels.conformance``) run by the built-in channels against their real
sinks (a local HTTP server, a tansu broker of the test's own) and by the example jsonl channel
(examples/jsonl-channel, from its source) against a file.

The stalls are real: the HTTP sink holds its answers; the broker is paused with SIGSTOP (by the
pid this test started) and resumed with SIGCONT.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import orjson
import pytest

from channels.conformance import CHECKS, Check, Target, run_check
from channels.http import HttpConfig
from channels.kafka import KafkaConfig
from poller.kit.dumper import DumperServer

from support import ce_id, consume_topic, new_topic

pytestmark = pytest.mark.integration

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "jsonl-channel"))
from jsonl_channel import JsonlConfig  # noqa: E402 - the example, from its source

_IDS = [c.__name__ for c in CHECKS]


class _HeldSink:
    """A dumper whose answers can be held back: the requests arrive and nothing answers."""

    def __init__(self) -> None:
        self._open = threading.Event()
        self._open.set()
        self.server = DumperServer("127.0.0.1", 0, out=open(os.devnull, "w"), keep=True,  # noqa: SIM115
                                   respond=self._respond)

    def _respond(self, event: dict[str, Any], headers: Any) -> None:
        self._open.wait(30)

    def ids(self) -> list[str]:
        return [str(e["id"]) for e in self.server.events]

    @contextmanager
    def stalled(self) -> Iterator[None]:
        self._open.clear()
        try:
            yield
        finally:
            self._open.set()


@pytest.mark.parametrize("mode", ["binary", "batch"])
@pytest.mark.parametrize("check", CHECKS, ids=_IDS)
def test_http_channel(check: Check, mode: str) -> None:
    sink = _HeldSink()
    with sink.server:
        run_check(check, Target(config=HttpConfig(sink=sink.server.url, mode=mode, timeout=10.0),
                                received=sink.ids, stall=sink.stalled, timeout=20.0))


@pytest.fixture(scope="module")
def own_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A tansu of this module's own: pausing the session's broker would stall other tests."""
    from poller.kit.localkafka import start_tansu

    with start_tansu(log_dir=tmp_path_factory.mktemp("tansu-conformance")) as broker:
        yield broker


def _paused(pid: int) -> Callable[[], Any]:
    @contextmanager
    def stalled() -> Iterator[None]:
        os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(pid, signal.SIGCONT)

    return stalled


@pytest.mark.parametrize("check", CHECKS, ids=_IDS)
def test_kafka_channel(check: Check, own_broker: Any) -> None:
    bootstrap = own_broker.endpoint
    topic = new_topic(bootstrap, partitions=1)

    def received() -> list[str]:
        return [ce_id(r) for r in consume_topic(bootstrap, topic, lambda records: False, timeout=3, settle=0.5)]

    config = KafkaConfig(bootstrap_servers=bootstrap, topic=topic,
                         extra=(("message.timeout.ms", "10000"),))
    run_check(check, Target(config=config, received=received, stall=_paused(own_broker.pid), timeout=30.0))


@pytest.mark.parametrize("check", CHECKS, ids=_IDS)
def test_example_jsonl_channel(check: Check, tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"

    def received() -> list[str]:
        if not path.exists():
            return []
        return [str(orjson.loads(line)["id"]) for line in path.read_bytes().splitlines()]

    run_check(check, Target(config=JsonlConfig(path=str(path)), received=received))


# -- the kit catches what it is for ----------------------------------------------------------------


class _Memory:
    """A sink in a list, and a channel into it that breaks one promise (``fault``)."""

    def __init__(self, fault: str) -> None:
        self.fault = fault
        self.got: list[str] = []

    def ids(self) -> list[str]:
        return list(self.got)

    @property
    def name(self) -> str:
        return "memory"

    @property
    def attempt_timeout(self) -> float:
        return 1.0

    def create(self, source: str) -> Any:
        from channels.base import Channel, Outcome

        memory = self

        class _Channel(Channel):
            keeps_order = True
            held: ClassVar[list[Any]] = []

            def publish(self, batch: Any, report: Any) -> None:
                for message in reversed(batch) if memory.fault == "reorder" else batch:
                    if memory.fault == "silent-on-close":
                        self.held.append(message)
                        continue
                    memory.got.append(message.id)
                    if memory.fault == "thread":  # as a channel of threads that forgot channels.reports
                        thread = threading.Thread(target=report, args=(message, Outcome.ACK, ""))
                        thread.start()
                        thread.join()
                        continue
                    report(message, Outcome.ACK, "")
                    if memory.fault == "twice":
                        report(message, Outcome.ACK, "")

        return _Channel()


@pytest.mark.parametrize(("fault", "check", "expected"), [
    ("silent-on-close", CHECKS[1], "never reported when aclose returned"),
    ("twice", CHECKS[0], "reported more than once"),
    ("reorder", CHECKS[2], "arrived out of order"),
    ("thread", CHECKS[0], "not the event loop's"),
])
def test_the_kit_catches_a_broken_channel(fault: str, check: Check, expected: str) -> None:
    from channels.conformance import ConformanceError

    memory = _Memory(fault)
    with pytest.raises(ConformanceError, match=expected):
        run_check(check, Target(config=memory, received=memory.ids, timeout=2.0))
