"""Fixtures of the fault suite: a case recorder that writes ``fault-report.md``, the channels to
deliver to, and pollers that are always stopped.

Run it alone with ``pytest -m faults``; it is part of the whole suite too. The report has one row
per case run in the session (rewritten after each case, so an interrupted run leaves the rows so
far): case, channel, sent, delivered, duplicates, lost, seconds, passed, notes.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
from filelock import FileLock

from shared_service import xdist_run_dir
from support import Deliveries, FaultCase, PollerProcess, SinkDeliveries, TopicDeliveries, dumper_sink, new_topic

log = logging.getLogger(__name__)

REPORT_PATH = Path(__file__).resolve().parents[2] / "fault-report.md"
# Flags every poller of the suite gets: two processes, short long polls (a SIGTERM ends quickly),
# a throughput line every 2 s in the log.
BASE_ARGS = ("--processes", "2", "--wait-time", "1", "--stats-interval", "2", "--shutdown-timeout", "20")
_PHASES: pytest.StashKey[dict[str, pytest.TestReport]] = pytest.StashKey()


@dataclass(frozen=True, slots=True)
class ReportRow:
    case: str
    channel: str
    sent: int | None
    delivered: int | None
    duplicates: int | None
    lost: int | None
    seconds: float
    passed: bool
    settled: bool  # counted after the flow ended (finish()), not as it stood when the case failed
    notes: str

    def markdown(self) -> str:
        def cell(value: int | None) -> str:
            return "?" if value is None else f"{value:,}"

        # A case that failed mid-flow was counted as it stood: what was not delivered yet may still
        # be on the queue, so it is "not delivered", not proven lost.
        lost = cell(self.lost) if self.settled or not self.lost else f"{self.lost:,} not delivered"
        return (f"| {self.case} | {self.channel} | {cell(self.sent)} | {cell(self.delivered)} | "
                f"{cell(self.duplicates)} | {lost} | {self.seconds:.0f} | "
                f"{'yes' if self.passed else '**no**'} | {self.notes} |")


class FaultReport:
    """The run's rows, written to ``path`` as a markdown table after each case.

    Under pytest-xdist each worker adds its rows to ``shared`` (a JSON-lines file all workers of
    the run append to, under a lock), and the table is written from all of them: the last case to
    end writes the whole run's report, whichever worker ran it.
    """

    def __init__(self, path: Path, shared: Path | None = None) -> None:
        self.path = path
        self.rows: list[ReportRow] = []
        self._shared = shared
        self._started = time.time()

    def add(self, case: FaultCase, passed: bool, failure: str) -> None:
        tally = case.tally
        notes = list(case.notes)
        if tally is not None and tally.dead:
            notes.insert(0, f"{len(tally.dead)} in the DLQ")
        if not passed and failure:
            notes.append(failure)
        row = ReportRow(
            case=case.case, channel=case.channel,
            sent=len(tally.sent) if tally else None,
            delivered=len(tally.delivered.keys() & tally.sent) if tally else None,
            duplicates=tally.duplicates if tally else None,
            lost=len(tally.lost) if tally else None,
            seconds=case.seconds or 0.0, passed=passed, settled=case.settled,
            notes="; ".join(notes).replace("|", "\\|").replace("\n", " "),
        )
        self.rows.append(row)
        if self._shared is None:
            self.write(self.rows, self._started)
            return
        with FileLock(str(self._shared.with_suffix(".lock"))):
            with self._shared.open("a") as out:
                out.write(json.dumps({"started": self._started, **asdict(row)}) + "\n")
            shared = [json.loads(line) for line in self._shared.read_text().splitlines()]
            started = min(raw.pop("started") for raw in shared)
            self.write([ReportRow(**raw) for raw in shared], started)

    def write(self, rows: Sequence[ReportRow], started: float) -> None:
        in_cases = sum(row.seconds for row in rows)
        wall = time.time() - started
        lines = [
            "# Fault suite report",
            "",
            f"{sum(r.passed for r in rows)} of {len(rows)} cases passed; {in_cases:.0f} s in the cases, "
            f"{wall:.0f} s of wall time since the first case's setup.",
            "`delivered`: distinct messages the sink or topic received; `duplicates`: extra copies anywhere "
            "(sink, DLQ, still queued); `lost`: sent and found nowhere.",
            "",
            "| case | channel | sent | delivered | duplicates | lost | seconds | passed | notes |",
            "|---|---|---:|---:|---:|---:|---:|---|---|",
            *(row.markdown() for row in rows),
            "",
        ]
        self.path.write_text("\n".join(lines))


def _first_line(report: pytest.TestReport) -> str:
    """The failure's one-line message (the assertion, or the exception)."""
    crash = getattr(report.longrepr, "reprcrash", None)
    message = crash.message if crash is not None else str(report.longrepr)
    return message.splitlines()[0][:160] if message.strip() else "failed"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Keep each phase's report on the item: the case fixture reads the call's outcome."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    item.stash.setdefault(_PHASES, {})[report.when] = report


@pytest.fixture(scope="session")
def fault_report(tmp_path_factory: pytest.TempPathFactory) -> FaultReport:
    run_dir = xdist_run_dir(tmp_path_factory.getbasetemp())
    return FaultReport(REPORT_PATH, None if run_dir is None else run_dir / "fault-report-rows.jsonl")


@pytest.fixture
def fault_case(request: pytest.FixtureRequest, fault_report: FaultReport) -> Iterator[Callable[..., FaultCase]]:
    """``fault_case(case, channel, max_duplicates=N)`` -> the case's recorder; a report row at teardown."""
    cases: list[FaultCase] = []

    def make(case: str, channel: str, *, max_duplicates: int) -> FaultCase:
        recorder = FaultCase(case, channel, max_duplicates)
        cases.append(recorder)
        return recorder

    yield make
    call = request.node.stash.get(_PHASES, {}).get("call")
    passed = call is not None and call.passed
    failure = _first_line(call) if call is not None and call.failed else ""
    for recorder in cases:
        if not passed:
            recorder.count_after_failure()
        if call is not None:  # the whole test body, counting included
            recorder.seconds = call.duration
        fault_report.add(recorder, passed, failure)


@pytest.fixture(params=["http", "kafka"])
def deliveries(request: pytest.FixtureRequest) -> Iterator[Deliveries]:
    """Each channel in turn: a dumper sink, or a new 3-partition topic on the session broker."""
    if request.param == "http":
        with dumper_sink() as server:
            yield SinkDeliveries(server)
    else:
        bootstrap: str = request.getfixturevalue("kafka_broker")
        yield TopicDeliveries(bootstrap, new_topic(bootstrap, partitions=3))


@pytest.fixture
def start_poller(aws_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., PollerProcess]]:
    """``start_poller(queue_url, deliveries_args, *extra, env=..., unset=...)``: ``poller run``
    with the suite's base flags; every poller still running at teardown is killed (group)."""
    started: list[PollerProcess] = []

    def start(queue_url: str, channel_args: Sequence[str], *extra: str, env: dict[str, str] | None = None,
              unset: Sequence[str] = ()) -> PollerProcess:
        log_path = tmp_path / f"poller-{len(started)}.log"
        args = ["--queue-url", queue_url, *channel_args, *BASE_ARGS, *extra]
        poller = PollerProcess(args, aws_env if env is None else env, log_path, unset=unset)
        started.append(poller)
        log.info("poller %d: %s (log %s)", poller.pid, " ".join(args), log_path)
        return poller

    yield start
    for poller in started:
        poller.kill()  # the whole group: also the orphaned workers of a killed supervisor
