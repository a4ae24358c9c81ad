"""The start: how workers are started (fork while it is safe, ``poller.supervisor``), what a
worker imports, and how SQS's endpoint is resolved without a botocore client."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, MutableSequence
from pathlib import Path
from typing import Any

import botocore.session
import pytest

from poller import supervisor as supervisor_module
from poller.sqs import resolve_target

from support import free_port

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

# -- SQS's endpoint: the same as a boto3 client's -----------------------------------------------

_ENDPOINT_CASES = [
    ("eu-west-2", None, {}),
    ("cn-north-1", None, {}),
    ("us-gov-west-1", None, {}),
    ("us-east-1", None, {"AWS_USE_FIPS_ENDPOINT": "true"}),
    ("us-east-1", None, {"AWS_USE_DUALSTACK_ENDPOINT": "true"}),
    ("eu-west-1", None, {"AWS_ENDPOINT_URL_SQS": "http://127.0.0.1:4566"}),
    ("eu-west-1", None, {"AWS_ENDPOINT_URL": "http://localhost:4567"}),
    ("eu-west-1", None, {"AWS_ENDPOINT_URL_SQS": "http://127.0.0.1:4566",
                         "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": "true"}),
    ("eu-west-1", "http://[::1]:4566", {"AWS_ENDPOINT_URL_SQS": "http://127.0.0.1:4566"}),
]


@pytest.fixture
def aws_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """No AWS setting of this machine's: an empty config file and no AWS_* variables."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    config = tmp_path / "config"
    config.write_text("")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    yield config


@pytest.mark.parametrize(("region", "given", "env"), _ENDPOINT_CASES)
def test_the_endpoint_is_a_clients(aws_config: Path, monkeypatch: pytest.MonkeyPatch, region: str,
                                   given: str | None, env: dict[str, str]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    client = botocore.session.Session().create_client("sqs", region_name=region, endpoint_url=given)
    target = resolve_target("https://sqs.eu-west-1.amazonaws.com/123456789012/q", region=region, endpoint_url=given)
    assert target.endpoint_url == client.meta.endpoint_url


def test_the_profiles_endpoint_is_a_clients(aws_config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    aws_config.write_text("[profile local]\nregion = eu-west-1\nservices = here\n\n"
                          "[services here]\nsqs =\n  endpoint_url = http://127.0.0.1:9324\n")
    client = botocore.session.Session(profile="local").create_client("sqs")
    target = resolve_target("http://127.0.0.1:9324/000000000000/q", region=None, endpoint_url=None, profile="local")
    assert target.endpoint_url == client.meta.endpoint_url == "http://127.0.0.1:9324"


@pytest.mark.parametrize(("region", "given"), [("not a region!", None), ("eu-west-1", "not a url")])
def test_a_bad_region_or_endpoint_is_a_value_error(aws_config: Path, region: str, given: str | None) -> None:
    with pytest.raises(ValueError, match="cannot configure SQS"):
        resolve_target("https://sqs.eu-west-1.amazonaws.com/123456789012/q", region=region, endpoint_url=given)


# -- how workers start ---------------------------------------------------------------------------

# Set in the supervisor's process: a forked worker has it, a spawned one imports this module afresh.
FORKED_FROM: int | None = None


def _listening_sockets() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            with socket.socket(fileno=os.dup(int(fd))) as sock:
                count += sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        except OSError:
            continue
    return count


def reporting_worker(slot: int, config: Any, stats: MutableSequence[int], parent_pid: int,
                     heartbeat: Any = None, budget: Any = None) -> None:
    """Writes what it started with, then exits 1: the supervisor starts it again (a restart)."""
    out = Path(os.environ["START_REPORT_DIR"])
    report = {
        "forked": parent_pid == FORKED_FROM,
        "sigterm": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
        "sigint": signal.getsignal(signal.SIGINT) == signal.SIG_DFL,
        "sighup": signal.getsignal(signal.SIGHUP) == signal.SIG_DFL,
        "blocked": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])),
        "listening": _listening_sockets(),
    }
    starts = len(list(out.glob("start-*.json")))
    (out / f"start-{starts}.json").write_text(json.dumps(report))
    raise SystemExit(1)


def serve_reports(health_port: int, thread: bool) -> int:
    """The supervisor's process, with ``reporting_worker``; /healthz on ``health_port`` (0: none);
    ``thread``: another thread runs in it before the workers start."""
    global FORKED_FROM
    from test_supervisor import run_config

    from poller.logs import setup_logging

    setup_logging("INFO")
    FORKED_FROM = os.getpid()
    if thread:
        threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()
    supervisor = supervisor_module.Supervisor(run_config(1), worker_target=reporting_worker)
    if health_port:
        supervisor.serve_http("127.0.0.1", health_port, metrics=False)
    return supervisor.run()


def _reports(tmp_path: Path, *, health_port: int = 0, thread: bool = False, count: int = 2) -> list[dict[str, Any]]:
    code = (f"import sys; sys.path[:0] = [{str(TESTS)!r}, {str(REPO)!r}]; from test_start import serve_reports; "
            f"sys.exit(serve_reports({health_port}, {thread}))")
    env = {**os.environ, "START_REPORT_DIR": str(tmp_path)}
    with open(tmp_path / "supervisor.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while len(list(tmp_path.glob("start-*.json"))) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, (tmp_path / "supervisor.log").read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return [json.loads((tmp_path / f"start-{i}.json").read_text()) for i in range(count)]


_CLEAN = {"sigterm": True, "sigint": True, "sighup": True, "blocked": [], "listening": 0}


def test_the_first_worker_is_forked_clean_and_restarts_are_spawned_once_http_is_served(tmp_path: Path) -> None:
    first, restart = _reports(tmp_path, health_port=free_port())
    assert first == {"forked": True, **_CLEAN}  # the port was bound before the fork: not held here
    assert restart == {"forked": False, **_CLEAN}  # the HTTP server's thread runs by then
    log = (tmp_path / "supervisor.log").read_text()
    assert "(pid" in log and ", fork)" in log and ", spawn)" in log, log


def test_without_http_restarts_are_forked_too(tmp_path: Path) -> None:
    assert _reports(tmp_path) == [{"forked": True, **_CLEAN}] * 2


def test_a_supervisor_with_another_thread_spawns(tmp_path: Path) -> None:
    assert _reports(tmp_path, thread=True) == [{"forked": False, **_CLEAN}] * 2


@pytest.mark.parametrize("signum, handler", [
    # forked: the supervisor's handler is in place, and would carry on in the child
    (signal.SIGTERM, "signal.signal(signal.SIGTERM, lambda *args: sys.exit(7))"),
    # spawned, Ctrl-C to the group: Python's own handler would raise KeyboardInterrupt (a traceback)
    (signal.SIGINT, "pass"),
])
def test_a_signal_sent_while_a_worker_starts_ends_it_quietly(signum: signal.Signals, handler: str) -> None:
    """The state a worker begins in: its signals blocked since the supervisor started it (by fork
    or spawn), the handler it came with, and a signal that came meanwhile. It ends the worker by
    the default action (it holds nothing yet), with no handler run and no traceback."""
    code = ("import os, signal, sys\n"
            "from poller import supervisor\n"
            f"{handler}\n"
            "signal.pthread_sigmask(signal.SIG_BLOCK, supervisor._HANDLED)\n"
            f"os.kill(os.getpid(), {int(signum)})\n"
            "supervisor._worker_process(sys.exit, 0)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, timeout=60)
    assert result.returncode == -signum, result.stderr.decode()
    assert b"Traceback" not in result.stderr, result.stderr.decode()


def test_a_workers_modules_leave_out_the_clis() -> None:
    """What a spawned worker imports (the supervisor's module for its first code, the worker, the
    http channel): none of the CLI's, the metrics server's or the Kafka channel's libraries."""
    code = ("import json, sys, poller.supervisor, poller.worker, channels.http\n"
            "print(json.dumps(sorted(sys.modules)))")
    modules = set(json.loads(subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                                            check=True, timeout=60).stdout))
    unwanted = {"click", "cloup", "prometheus_client", "confluent_kafka", "cloudevents", "boto3",
                "poller.options", "poller.metrics", "channels.registry"}
    assert not modules & unwanted
