"""``poller demo`` headless: the sample messages arrive at the dumper, and nothing is left running.

Uses the session's LocalStack through ``--endpoint-url`` (the demo then starts no SQS of its own).
Every process the demo starts is watched through /proc while it runs (its process tree and the
sessions they are in); after it exits, none of them may still be alive.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import pytest

pytestmark = pytest.mark.integration

POLLER = str(Path(sys.executable).with_name("poller"))


def _stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, session id, start time in clock ticks) of a live process, from /proc/<pid>/stat."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = text.rpartition(")")[2].split()  # the command name may hold spaces and parens
    state = fields[0]
    if state in ("Z", "X"):  # a zombie is gone, only not yet reaped
        return None
    return int(fields[1]), int(fields[3]), int(fields[19])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


class ProcessWatcher:
    """Collects the descendants of ``root`` (pid, start time) and their session ids while it runs."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.seen: dict[int, int] = {}  # pid -> start time
        self.sessions: set[int] = set()
        self.parents: dict[int, int] = {}  # pid -> its parent when first seen
        self.cmdlines: dict[int, str] = {}
        self.orphaned: set[int] = set()  # seen alive after their parent was gone
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProcessWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.scan()

    def scan(self) -> None:
        stats = {pid: s for pid in _all_pids() if (s := _stat(pid)) is not None}
        for pid, (ppid, _, started) in stats.items():
            if self.seen.get(pid) == started and ppid != self.parents[pid]:
                self.orphaned.add(pid)
        tree = {self.root}
        changed = True
        while changed:
            changed = False
            for pid, (ppid, _, _) in stats.items():
                if ppid in tree and pid not in tree:
                    tree.add(pid)
                    changed = True
        for pid in tree:
            if pid in stats:
                self.seen.setdefault(pid, stats[pid][2])
                self.parents.setdefault(pid, stats[pid][0])
                if pid not in self.cmdlines:
                    self.cmdlines[pid] = _cmdline(pid)
                self.sessions.add(stats[pid][1])

    def still_running(self, ignore_sessions: set[int]) -> list[str]:
        left = []
        for pid in _all_pids():
            stat = _stat(pid)
            if stat is None:
                continue
            _, sid, started = stat
            if self.seen.get(pid) == started or (sid in self.sessions and sid not in ignore_sessions):
                left.append(f"{pid}: {_cmdline(pid)}")
        return left


def test_demo_headless(sqs_endpoint: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "POLLER_", "K_SINK", "K_CE_"))}
    env["SQS_POLLER_DOCKER"] = "0"
    started = time.monotonic()
    demo = subprocess.Popen(
        [POLLER, "demo", "--duration", "8", "--messages", "3", "--endpoint-url", sqs_endpoint],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True,  # its own session: whatever it starts is recognisable by sid
    )
    with ProcessWatcher(demo.pid) as watcher:
        try:
            stdout, stderr = demo.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(demo.pid, 9)
            demo.communicate()
            pytest.fail("poller demo did not stop within 90 s")
    elapsed = time.monotonic() - started
    out, err = stdout.decode(), stderr.decode()

    assert demo.returncode == 0, f"exit {demo.returncode}\n{err}"
    assert "Traceback" not in err, err
    assert elapsed < 60, f"the demo took {elapsed:.0f} s for --duration 8"

    events = []
    for line in out.splitlines():
        line = line.strip()
        if not line:
            continue
        event = orjson.loads(line)  # stdout carries only the dumper's one-line events
        events.append(event)
    assert len(events) == 3, out
    assert len({e["id"] for e in events}) == 3
    for event in events:
        assert event["type"] == "aws.sqs.message"
        assert event["specversion"] == "1.0"
        assert event["source"].startswith(sqs_endpoint.rstrip("/").rsplit(":", 1)[0])
        assert "poller-demo-" in event["source"]
        assert "coffee" in event["data"]["Body"]
        assert event["data"]["MessageId"] == event["id"]
        assert event["origin"] == "poller-demo"  # the samples' message attribute, as an extension
    assert sorted(orjson.loads(e["data"]["Body"])["order"] for e in events) == [1, 2, 3]
    send_hint = [line for line in err.splitlines() if "send one of your own" in line]
    assert len(send_hint) == 1 and "aws sqs send-message" in send_hint[0] and "--queue-url" in send_hint[0]
    assert "throughput 0 msg/s" not in err
    assert "is not forwarded" not in err, err  # the demo's own samples need no explaining

    # the poller it started was seen (the watcher works), and nothing it started is left
    commands = watcher.cmdlines.values()
    assert any(" run " in c and "--queue-url" in c for c in commands), commands
    # a worker: forked, it has the supervisor's command line; spawned, spawn_main's
    runs = [c for c in commands if (" run " in c and "--queue-url" in c) or "spawn_main" in c]
    assert len(runs) >= 2, f"no worker process seen: {commands}"
    # A worker never outlives its supervisor. (multiprocessing's resource tracker does, by design:
    # it exits when the supervisor's end of its pipe closes.)
    orphans = [f"{pid}: {watcher.cmdlines.get(pid)}" for pid in watcher.orphaned
               if "resource_tracker" not in watcher.cmdlines.get(pid, "")]
    assert not orphans, "outlived their parent:\n" + "\n".join(orphans)
    left = watcher.still_running(ignore_sessions={os.getsid(0)})
    assert not left, "left running after the demo exited:\n" + "\n".join(left)
