"""A local service as a child process: start it, wait until it answers, stop it by pid.

:class:`Service` owns the process, its temp dirs and its log file; ``Service.stop()`` undoes it
all. :func:`start_process` launches a :class:`Launch` and returns a ready ``Service`` or raises
:class:`ServiceError` with the tail of the service's log. What each service runs is in
``localsqs`` and ``localkafka``; nothing here is global.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

__all__ = [
    "HOST",
    "Launch",
    "Service",
    "ServiceError",
    "check_port_free",
    "clean_env",
    "free_port",
    "http_answers",
    "log_file",
    "port_open",
    "remove_tree",
    "start_process",
    "wait_for",
    "with_log_tail",
]

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
STOP_GRACE_S = 10.0  # LocalStack needs a few seconds to exit after SIGTERM


class ServiceError(RuntimeError):
    """A service could not be installed or started."""


class Service:
    """A running service: ``name``, ``endpoint``, ``pid`` (None when external) and ``stop()``.

    The process is expected to lead its own session (``start_new_session=True``), so ``stop()``
    signals the whole process group: SIGTERM, ``grace`` seconds, then SIGKILL.
    """

    def __init__(
        self,
        name: str,
        endpoint: str,
        process: subprocess.Popen[bytes] | None = None,
        *,
        log_path: Path | None = None,
        cleanup: Sequence[Callable[[], object]] = (),
        grace: float = STOP_GRACE_S,
    ) -> None:
        self.name = name
        self.endpoint = endpoint
        self.log_path = log_path
        self.grace = grace
        self._process = process
        self._cleanup = list(cleanup)
        self._stopped = False

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        return _tail(self.log_path, lines)

    def stop(self) -> None:
        """Stop the process group and remove what was created for it. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        try:
            if self._process is not None:
                _terminate(self._process, self.grace)
        finally:
            for fn in reversed(self._cleanup):
                try:
                    fn()
                except Exception:  # cleanup must not mask the stop itself
                    log.warning("cleanup of %s failed", self.name, exc_info=True)

    def __enter__(self) -> Service:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"Service(name={self.name!r}, endpoint={self.endpoint!r}, pid={self.pid})"


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _terminate(proc: subprocess.Popen[bytes], grace: float) -> None:
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            log.warning("pid %d ignored SIGTERM for %.1f s; sending SIGKILL", proc.pid, grace)
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    # Children that outlived the leader would keep ports and files busy.
    _signal_group(proc.pid, signal.SIGKILL)


# --------------------------------------------------------------------------- ports and probes


def free_port(host: str = HOST) -> int:
    """A port that was free a moment ago (the OS picks it); a tiny race is accepted."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def check_port_free(port: int, host: str = HOST) -> None:
    """Fail fast: LocalStack keeps running (unready) when its port is taken.

    SO_REUSEADDR as the servers set it, so TIME_WAIT leftovers of a stopped broker do not count.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ServiceError(f"port {host}:{port} is in use ({exc.strerror})") from None


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def http_answers(url: str) -> bool:
    """True for any HTTP answer, error statuses included."""
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False


def wait_for(
    predicate: Callable[[], object],
    timeout: float,
    what: str,
    *,
    interval: float = 0.1,
    process: subprocess.Popen[bytes] | None = None,
    log_path: Path | None = None,
) -> None:
    """Poll ``predicate`` until truthy. Exceptions count as "not yet".

    Raises ServiceError on timeout, or at once if ``process`` exits meanwhile (with the log tail).
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except Exception:  # noqa: BLE001 - a readiness check that fails is not ready yet
            pass
        if process is not None and process.poll() is not None:
            raise ServiceError(with_log_tail(
                f"{what}: process exited with code {process.returncode} during startup", log_path))
        if time.monotonic() >= deadline:
            raise ServiceError(with_log_tail(f"{what}: not ready after {timeout:.0f} s", log_path))
        time.sleep(interval)


# --------------------------------------------------------------------------- logs and temp dirs


def _tail(path: Path | None, lines: int = 20) -> str:
    if path is None or not path.exists():
        return ""
    text = path.read_text(errors="replace").rstrip()
    return "\n".join(text.splitlines()[-lines:])


def with_log_tail(message: str, path: Path | None) -> str:
    """``message`` followed by the last lines of the log at ``path``, if it has any."""
    tail = _tail(path)
    return f"{message}; last lines of {path}:\n{tail}" if tail else message


def remove_tree(path: Path) -> Callable[[], None]:
    """A cleanup step for :class:`Service`: remove ``path``, whatever is in it."""
    return lambda: shutil.rmtree(path, ignore_errors=True)


def log_file(log_dir: Path | None, name: str, port: int, cleanup: list[Callable[[], object]]) -> Path:
    """A new log file for one start of ``name``; in a temp dir removed on stop unless ``log_dir``."""
    if log_dir is None:
        tmp = Path(tempfile.mkdtemp(prefix=f"sqs-poller-{name}-log-"))
        cleanup.append(remove_tree(tmp))  # the tail goes into ServiceError, so the file is not needed after
        log_dir = tmp
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    return log_dir / f"{name}-{port}-{uuid.uuid4().hex[:6]}.log"


def clean_env(extra: Mapping[str, str]) -> dict[str, str]:
    """Our environment without what points Python at our venv, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env.update(extra)
    return env


# --------------------------------------------------------------------------- spawning


@dataclass(frozen=True, slots=True)
class Launch:
    """What to run for one service, where it will answer and where its output goes."""

    name: str
    argv: tuple[str, ...]
    endpoint: str  # "http://host:port" or "host:port": the port is checked free before the start
    log_path: Path
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: Path | None = None


def _spawn(launch: Launch) -> subprocess.Popen[bytes]:
    argv: tuple[str, ...] = launch.argv
    setpriv = shutil.which("setpriv")
    if setpriv and threading.current_thread() is threading.main_thread():
        # PR_SET_PDEATHSIG: the service gets SIGTERM if we die without stop() (SIGKILL, timeout).
        # Main thread only: the kernel ties it to the forking thread, not to the process.
        argv = (setpriv, "--pdeathsig", "TERM", "--", *argv)
    with open(launch.log_path, "ab") as out:
        # Own session: stop() can signal the group, and a Ctrl-C meant for us does not hit it first.
        return subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=dict(launch.env) or None, cwd=launch.cwd, start_new_session=True,
        )


def start_process(
    launch: Launch,
    ready: Callable[[], object],
    timeout: float,
    cleanup: list[Callable[[], object]],
) -> Service:
    """Start ``launch`` and wait until ``ready()``; on any failure stop it and run ``cleanup``."""
    started = time.monotonic()
    service = Service(launch.name, launch.endpoint, log_path=launch.log_path, cleanup=cleanup)
    try:  # any failure from here on stops what was started and removes the temp dirs
        check_port_free(int(launch.endpoint.rsplit(":", 1)[1]))
        proc = service._process = _spawn(launch)
        wait_for(ready, timeout, f"{launch.name} on {launch.endpoint}", process=proc, log_path=launch.log_path)
    except BaseException:
        service.stop()
        raise
    log.info("%s ready on %s (pid %d) in %.1f s", launch.name, launch.endpoint, proc.pid, time.monotonic() - started)
    return service
