"""A contender as a child process: its own session (so its whole tree can be frozen and signalled),
its output in a log file, a readiness rule, CPU read from ``/proc`` for the whole tree, stop by pid.

Every contender (the poller, mq-bridge, the boto3 loops) runs this way, so the same rules apply
to all: measured from outside, as the process tree the user would run.
"""

from __future__ import annotations

import http.client
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from benchmarks import procstat

__all__ = ["ContenderProcess", "ContenderSpec", "ReadyRule", "health_ready", "log_ready", "worker_pids"]

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent

ReadyRule = Callable[["ContenderProcess"], bool]


@dataclass(frozen=True, slots=True)
class ContenderSpec:
    label: str                        # the row's name: "poller p1", "mq-bridge", ...
    family: str                       # "poller", "mq-bridge", "naive", "good", "ceiling"
    argv: tuple[str, ...]
    ready: ReadyRule
    env: Mapping[str, str] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)  # what the report shows of its config


def log_ready(text: str) -> ReadyRule:
    """Ready once its log holds ``text`` (our own wrappers print it when their clients are built)."""
    return lambda proc: text in proc.log_text()


def _http_ok(host: str, port: int, path: str) -> bool:
    conn = http.client.HTTPConnection(host, port, timeout=2)
    try:
        conn.request("GET", path)
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


_HELPERS = ("resource_tracker", "forkserver")  # multiprocessing's own processes, not workers


def worker_pids(pid: int) -> list[int]:
    """The poller's worker processes: its children, however they were started (spawn, fork, or a
    forkserver's children), but not multiprocessing's resource tracker or forkserver."""
    workers = []
    for child in procstat.children(pid):
        line = procstat.cmdline(child)
        if "forkserver" in line:
            workers += [c for c in procstat.children(child) if not any(h in procstat.cmdline(c) for h in _HELPERS)]
        elif not any(h in line for h in _HELPERS):
            workers.append(child)
    return workers


def health_ready(port: int, processes: int | None) -> ReadyRule:
    """The poller's documented probes: /readyz (SQS answered, a channel started) and /healthz (every
    worker alive and sending heartbeats, which it does only once all its loops run), plus the
    expected number of worker processes under the supervisor."""

    def ready(proc: ContenderProcess) -> bool:
        if not (_http_ok("127.0.0.1", port, "/readyz") and _http_ok("127.0.0.1", port, "/healthz")):
            return False
        return len(worker_pids(proc.pid)) >= (processes or 1)

    return ready


class ContenderProcess:
    def __init__(self, spec: ContenderSpec, log_dir: Path) -> None:
        self.spec = spec
        stem = spec.label.replace(" ", "-").replace("/", "-")
        self.log_path = log_dir / f"{stem}-{int(time.time() * 1000) % 10**8}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()/kill()
        self.proc = subprocess.Popen(
            list(spec.argv), env={**os.environ, **spec.env}, cwd=ROOT,
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    # -- state

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 25) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def pids(self) -> list[int]:
        return procstat.tree(self.pid)

    def cpu(self) -> dict[int, float]:
        """CPU seconds so far of every process of the tree, by pid."""
        return procstat.process_cpu(self.pids())

    def rss(self) -> int:
        return procstat.tree_rss(self.pid)

    # -- control

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.spec.ready(self):
            if not self.alive():
                raise RuntimeError(f"{self.spec.label} exited with code {self.proc.returncode} before it was "
                                   f"ready; log tail:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.spec.label} not ready after {timeout:.0f} s; log tail:\n{self.log_tail()}")
            time.sleep(0.1)

    def _signal(self, signum: signal.Signals) -> None:
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            pass

    def freeze(self) -> None:
        """SIGSTOP to the whole group; returns once every process of the tree is stopped."""
        self._signal(signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while not all(procstat.is_stopped(p) for p in self.pids()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.spec.label} did not stop on SIGSTOP")
            time.sleep(0.005)

    def thaw(self) -> None:
        self._signal(signal.SIGCONT)

    def stop(self, timeout: float = 40.0) -> int | None:
        """SIGTERM (and SIGCONT, in case it is frozen); the group is killed if it outlives ``timeout``."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            self.thaw()
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not exit within %.0f s of SIGTERM: killed", self.spec.label, timeout)
            self.kill()
            return None
        self._signal(signal.SIGKILL)  # leftovers of the group, if any
        self._log.close()
        return code

    def kill(self) -> None:
        self._signal(signal.SIGKILL)
        self.proc.wait()
        self._log.close()

    def __enter__(self) -> ContenderProcess:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.alive():
            self.kill()
        elif not self._log.closed:
            self._log.close()
