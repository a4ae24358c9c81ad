"""Bad input to ``poller run``: a non-zero exit, exactly one line on stderr, never a traceback.

The cases call the CLI in this process (``poller.cli.main(argv)``, with the environment replaced
and stderr captured at the file descriptor), against the session's LocalStack; a few run the
real console script (``.venv/bin/poller``) end to end. Flag and config errors must fail before
any log line, so the one-line check is strict at the default log level; the cases that reach SQS
fail before the first log line too (the check of the queue comes before any logging).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import orjson
import pytest

from poller.cli import main

from faultproxy import CannedResponse, FaultProxy, HttpError
from support import free_port, queue_counts, send_messages, silent_server

pytestmark = pytest.mark.integration

POLLER = str(Path(sys.executable).with_name("poller"))
TIMEOUT = 60  # seconds per subprocess; every case is expected to take well under this
# Environment the caller may have set that would change what a case tests.
_SCRUBBED_PREFIXES = ("POLLER_", "K_SINK", "K_CE_OVERRIDES", "AWS_", "KAFKA_")


def _env(aws_env: Mapping[str, str], extra: Mapping[str, str] | None = None,
         drop: Sequence[str] = ()) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_PREFIXES)}
    env.update(aws_env)
    env.update(extra or {})
    for name in drop:
        env.pop(name, None)
    return env


@dataclass(frozen=True, slots=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


RunPoller = Callable[..., Result]


@pytest.fixture
def run_poller(monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> RunPoller:
    """``run_poller(argv, env)``: ``main(argv)`` in this process, with exactly ``env`` as the
    environment; the root logger (which the CLI sets up) is restored afterwards."""

    def run(args: Sequence[str], env: Mapping[str, str]) -> Result:
        for name in list(os.environ):
            monkeypatch.delenv(name)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        root = logging.getLogger()
        handlers, level = root.handlers[:], root.level
        capfd.readouterr()
        try:
            code = main(list(args))
        finally:
            root.handlers[:] = handlers
            root.setLevel(level)
        out, err = capfd.readouterr()
        return Result(code, out, err)

    return run


def run_poller_process(args: Sequence[str], env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """The real console script, end to end."""
    return subprocess.run([POLLER, *args], env=dict(env), capture_output=True, text=True,
                          timeout=TIMEOUT, stdin=subprocess.DEVNULL)


def assert_one_line_error(result: Result | subprocess.CompletedProcess[str], *expected: str) -> str:
    stderr = result.stderr
    assert result.returncode != 0, f"exit 0 on bad input; stderr={stderr!r}"
    assert "Traceback" not in stderr and "Traceback" not in result.stdout, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected exactly one line on stderr, got {len(lines)}: {stderr!r}"
    line = lines[0]
    assert line.startswith("poller: error:"), line
    for text in expected:
        assert text.lower() in line.lower(), f"{text!r} not in {line!r}"
    return line




@pytest.fixture(scope="module")
def queue_url(sqs: object) -> Iterator[str]:
    """One real queue for the whole module, so that only the bad input can be wrong."""
    url = sqs.create_queue(QueueName=f"cli-errors-{uuid.uuid4().hex[:8]}")["QueueUrl"]  # type: ignore[attr-defined]
    yield url
    sqs.delete_queue(QueueUrl=url)  # type: ignore[attr-defined]


SINK = "http://127.0.0.1:9/"  # never contacted: every case fails before sending anything

# (id, args after the queue/sink, extra env, env names to drop, texts the line must contain)
FLAG_CASES = [
    ("batch-size-0", ["--batch-size", "0"], {}, (), ["--batch-size"]),
    ("batch-size-11", ["--batch-size", "11"], {}, (), ["--batch-size"]),
    ("batch-size-env", [], {"POLLER_BATCH_SIZE": "0"}, (), ["POLLER_BATCH_SIZE"]),
    ("wait-time-21", ["--wait-time", "21"], {}, (), ["--wait-time"]),
    ("processes-0", ["--processes", "0"], {}, (), ["--processes"]),
    ("channel-foo", ["--channel", "foo"], {}, (), ["--channel"]),
    ("log-level-loud", ["--log-level", "LOUD"], {}, (), ["--log-level"]),
    ("sink-notaurl", ["--sink", "notaurl"], {}, (), ["notaurl"]),
    ("sink-no-host", ["--sink", "http://"], {}, (), ["sink", "http://"]),
    ("k-sink-notaurl", [], {"K_SINK": "notaurl"}, (), ["notaurl"]),
    ("overrides-not-json", [], {"K_CE_OVERRIDES": "{not json"}, (), ["K_CE_OVERRIDES"]),
    ("overrides-bad-name", [], {"K_CE_OVERRIDES": '{"extensions": {"Bad-Name": "x"}}'}, (),
     ["K_CE_OVERRIDES", "Bad-Name"]),
    ("overrides-reserved-name", [], {"K_CE_OVERRIDES": '{"extensions": {"id": "x"}}'}, (),
     ["K_CE_OVERRIDES"]),
    ("overrides-not-string", [], {"K_CE_OVERRIDES": '{"extensions": {"a": 1}}'}, (),
     ["K_CE_OVERRIDES"]),
    ("overrides-wrong-shape", [], {"K_CE_OVERRIDES": "[1, 2]"}, (), ["K_CE_OVERRIDES"]),
    # Checked only after the queue was read (the module's queue has no redrive policy, whose
    # warning must not come first).
    ("max-in-flight-below-batch", ["--max-in-flight", "5"], {}, (), ["--max-in-flight"]),
]


@pytest.mark.parametrize(("args", "extra", "drop", "expected"),
                         [c[1:] for c in FLAG_CASES], ids=[c[0] for c in FLAG_CASES])
def test_bad_flag(run_poller: RunPoller, aws_env: Mapping[str, str], queue_url: str, args: list[str],
                  extra: dict[str, str], drop: tuple[str, ...], expected: list[str]) -> None:
    sink = [] if "K_SINK" in extra or "--sink" in args else ["--sink", SINK]
    result = run_poller(["run", "--queue-url", queue_url, *sink, *args], _env(aws_env, extra, drop))
    assert_one_line_error(result, *expected)


def test_missing_queue_url(run_poller: RunPoller, aws_env: Mapping[str, str]) -> None:
    result = run_poller(["run", "--sink", SINK], _env(aws_env))
    assert_one_line_error(result, "--queue-url")


def test_http_channel_without_sink(run_poller: RunPoller, aws_env: Mapping[str, str], queue_url: str) -> None:
    result = run_poller(["run", "--queue-url", queue_url], _env(aws_env, drop=["K_SINK"]))
    assert_one_line_error(result, "sink")


@pytest.mark.parametrize("bad", ["notaurl", "http://", "ftp://sqs.example/123/q", "http://host:99999/q"])
def test_malformed_queue_url(run_poller: RunPoller, aws_env: Mapping[str, str], bad: str) -> None:
    result = run_poller(["run", "--queue-url", bad, "--sink", SINK], _env(aws_env))
    assert_one_line_error(result, "queue URL")


@pytest.mark.parametrize("bad", ["notaurl", "http://"])
def test_malformed_endpoint_url(run_poller: RunPoller, aws_env: Mapping[str, str], queue_url: str, bad: str) -> None:
    result = run_poller(["run", "--queue-url", queue_url, "--sink", SINK, "--endpoint-url", bad],
                        _env(aws_env))
    assert_one_line_error(result, "endpoint")


KAFKA = ["--channel", "kafka", "--kafka-bootstrap-servers", "127.0.0.1:9", "--kafka-topic", "t"]


@pytest.mark.parametrize(("config", "expected"), [
    ("nokey", ["--kafka-config", "entry 1"]),
    ("=value", ["--kafka-config"]),
    ("no.such.property=1", ["kafka-config", "no.such.property"]),
    ("message.max.bytes=notanumber", ["kafka-config", "message.max.bytes"]),
])
def test_bad_kafka_config(run_poller: RunPoller, aws_env: Mapping[str, str], queue_url: str, config: str,
                          expected: list[str]) -> None:
    result = run_poller(["run", "--queue-url", queue_url, *KAFKA, "--kafka-config", config], _env(aws_env))
    assert_one_line_error(result, *expected)


def test_kafka_config_env_bad_line_is_named_not_echoed(run_poller: RunPoller, aws_env: Mapping[str, str],
                                                       queue_url: str) -> None:
    env = {**_env(aws_env), "POLLER_KAFKA_CONFIG": "linger.ms=5\nhunter2 secret tail"}
    result = run_poller(["run", "--queue-url", queue_url, *KAFKA], env)
    line = assert_one_line_error(result, "POLLER_KAFKA_CONFIG line 2")
    assert "hunter2" not in result.stderr and "tail" not in result.stderr, line


def test_kafka_config_env_keeps_a_value_with_spaces_whole(run_poller: RunPoller, aws_env: Mapping[str, str],
                                                          queue_url: str) -> None:
    """Split per line, not per space: the config is valid, so the poller gets as far as the broker."""
    env = {**_env(aws_env), "POLLER_KAFKA_CONFIG": "sasl.password=abc def\n\n# a comment\nlinger.ms=5\n"}
    result = run_poller(["run", "--queue-url", queue_url, *KAFKA], env)
    line = assert_one_line_error(result, "cannot reach Kafka")
    assert "abc" not in result.stderr and "def" not in line.split("Kafka", 1)[1], line


def test_kafka_channel_without_topic(run_poller: RunPoller, aws_env: Mapping[str, str], queue_url: str) -> None:
    result = run_poller(["run", "--queue-url", queue_url, "--channel", "kafka",
                         "--kafka-bootstrap-servers", "127.0.0.1:9"], _env(aws_env))
    assert_one_line_error(result, "--kafka-topic")


@pytest.mark.parametrize(("flags", "expected"), [
    (["--kafka-topic", "orders"], ["--kafka-topic", "kafka channel", "--channel kafka"]),
    (["--channel", "kafka", "--kafka-bootstrap-servers", "127.0.0.1:9", "--kafka-topic", "t",
      "--http-timeout", "5"], ["--http-timeout", "http channel", "--channel http"]),
])
def test_a_flag_of_the_other_channel_is_an_error_that_names_it(
    run_poller: RunPoller, aws_env: Mapping[str, str], queue_url: str, flags: list[str], expected: list[str]
) -> None:
    sink = [] if "kafka" in flags else ["--sink", SINK]
    result = run_poller(["run", "--queue-url", queue_url, *sink, *flags], _env(aws_env))
    assert_one_line_error(result, *expected)
    assert result.returncode == 2


def test_overrides_without_the_extensions_wrapper_are_an_error(
    run_poller: RunPoller, aws_env: Mapping[str, str], queue_url: str
) -> None:
    result = run_poller(["run", "--queue-url", queue_url, "--sink", SINK],
                        _env(aws_env, {"K_CE_OVERRIDES": '{"team": "a"}'}))
    assert_one_line_error(result, "K_CE_OVERRIDES", "extensions", "team")


def test_bootstrap_servers_given_as_a_url_get_a_hint_at_once(
    run_poller: RunPoller, aws_env: Mapping[str, str], queue_url: str
) -> None:
    result = run_poller(["run", "--queue-url", queue_url, "--channel", "kafka", "--kafka-topic", "t",
                         "--kafka-bootstrap-servers", "http://127.0.0.1:9092"], _env(aws_env))
    assert_one_line_error(result, "host:port", "not a URL")


def test_an_arn_of_another_service_is_an_error_that_says_so(
    run_poller: RunPoller, aws_env: Mapping[str, str]
) -> None:
    result = run_poller(["run", "--queue-url", "arn:aws:sns:us-east-1:123456789012:topic", "--sink", SINK],
                        _env(aws_env))
    assert_one_line_error(result, "ARN", "arn:aws:sqs:REGION:ACCOUNT:NAME")


def test_poller_alone_prints_its_help_not_an_error(run_poller: RunPoller, aws_env: Mapping[str, str]) -> None:
    result = run_poller([], _env(aws_env))
    assert result.returncode == 0 and result.stderr == ""
    assert "Commands:" in result.stdout and "run" in result.stdout


def test_version_is_pyprojects(run_poller: RunPoller, aws_env: Mapping[str, str]) -> None:
    version = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    result = run_poller(["--version"], _env(aws_env))
    assert result.returncode == 0 and not result.stderr
    assert result.stdout == f"poller, version {version['project']['version']}\n"


@pytest.mark.parametrize("command", ["dump", "channel"])
def test_a_local_server_on_a_taken_port_is_one_line_naming_it(
    run_poller: RunPoller, aws_env: Mapping[str, str], command: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        extra = ["--subscriber", SINK] if command == "channel" else []
        result = run_poller([command, "--port", str(port), *extra], _env(aws_env))
    assert_one_line_error(result, "cannot listen", f"127.0.0.1:{port}")
    assert result.returncode == 3


def test_demo_with_a_dead_endpoint_is_one_line(run_poller: RunPoller, aws_env: Mapping[str, str]) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    result = run_poller(["demo", "--endpoint-url", endpoint, "--duration", "1"], _env(aws_env))
    assert_one_line_error(result, "nothing answers", endpoint)


# -- poller check ---------------------------------------------------------------------------------


def test_check_reports_a_good_queue_and_a_reachable_sink(
    run_poller: RunPoller, aws_env: Mapping[str, str], sqs: Any, make_queue: Any
) -> None:
    from poller.kit.dumper import DumperServer

    queue = make_queue(visibility_timeout=300, dlq_max_receive_count=4)
    with open(os.devnull, "w") as devnull, DumperServer("127.0.0.1", 0, out=devnull) as sink:
        result = run_poller(["check", "--queue-url", queue.url, "--sink", sink.url], _env(aws_env))
    assert result.returncode == 0, result.stderr
    report = result.stdout
    assert "ok       credentials" in report and f"ok       queue: {queue.url}" in report
    assert "visibility timeout 300 s" in report
    assert f"redrive policy: to {queue.dlq_arn} after 4 receives" in report
    assert "ok       sink: " in report and "warning" not in report


def test_check_warns_about_no_dlq_and_a_short_visibility(
    run_poller: RunPoller, aws_env: Mapping[str, str], make_queue: Any
) -> None:
    from poller.kit.dumper import DumperServer

    queue = make_queue(visibility_timeout=5)
    with open(os.devnull, "w") as devnull, DumperServer("127.0.0.1", 0, out=devnull) as sink:
        result = run_poller(["check", "--queue-url", queue.url, "--sink", sink.url], _env(aws_env))
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning")]
    assert len(warnings) == 2
    assert "no redrive policy" in warnings[0] and "visibility timeout 5 s is shorter" in warnings[1]


def test_check_fails_in_one_line_on_a_missing_queue_or_a_dead_sink(
    run_poller: RunPoller, aws_env: Mapping[str, str], queue_url: str
) -> None:
    missing = queue_url.rsplit("/", 1)[0] + f"/no-such-queue-{uuid.uuid4().hex[:8]}"
    result = run_poller(["check", "--queue-url", missing, "--sink", SINK], _env(aws_env))
    assert_one_line_error(result, "does not exist")
    assert result.returncode == 3
    result = run_poller(["check", "--queue-url", queue_url, "--sink", f"http://127.0.0.1:{free_port()}/"],
                        _env(aws_env))
    assert_one_line_error(result, "sink", "does not answer")
    assert result.returncode == 3


def test_check_kafka_finds_the_broker_and_the_topic(
    run_poller: RunPoller, aws_env: Mapping[str, str], queue_url: str, kafka_broker: str
) -> None:
    topic = f"check-{uuid.uuid4().hex[:8]}"
    kafka = ["check", "--queue-url", queue_url, "--channel", "kafka", "--kafka-bootstrap-servers", kafka_broker]
    result = run_poller([*kafka, "--kafka-topic", topic], _env(aws_env))
    assert_one_line_error(result, f"topic '{topic}' does not exist", "--kafka-create-topic")
    assert result.returncode == 3
    result = run_poller([*kafka, "--kafka-topic", topic, "--kafka-create-topic"], _env(aws_env))
    assert result.returncode == 0, result.stderr
    assert f"ok       kafka: {kafka_broker} answered; topic '{topic}' exists" in result.stdout


def test_check_takes_a_queue_arn(run_poller: RunPoller, aws_env: Mapping[str, str], queue_url: str) -> None:
    from poller.kit.dumper import DumperServer

    name = queue_url.rsplit("/", 1)[1]
    with open(os.devnull, "w") as devnull, DumperServer("127.0.0.1", 0, out=devnull) as sink:
        result = run_poller(["check", "--queue-url", f"arn:aws:sqs:us-east-1:000000000000:{name}",
                             "--sink", sink.url], _env(aws_env))
    assert result.returncode == 0, result.stderr
    assert f"ok       queue: https://sqs.us-east-1.amazonaws.com/000000000000/{name}" in result.stdout


# -- errors found at start, against the real SQS -----------------------------------------------


def test_queue_does_not_exist(run_poller: RunPoller, aws_env: Mapping[str, str], queue_url: str) -> None:
    missing = queue_url.rsplit("/", 1)[0] + f"/no-such-queue-{uuid.uuid4().hex[:8]}"
    result = run_poller(["run", "--queue-url", missing, "--sink", SINK], _env(aws_env))
    line = assert_one_line_error(result, "does not exist", missing)
    assert result.returncode == 3, line  # EXIT_BOOT


def test_endpoint_refuses_connections(run_poller: RunPoller, aws_env: Mapping[str, str], queue_url: str) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    result = run_poller(["run", "--queue-url", queue_url, "--sink", SINK, "--endpoint-url", endpoint],
                        _env(aws_env))
    assert_one_line_error(result, "cannot reach SQS", endpoint)


def test_endpoint_refuses_connections_via_env(run_poller: RunPoller, aws_env: Mapping[str, str],
                                              queue_url: str) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    result = run_poller(["run", "--queue-url", queue_url, "--sink", SINK],
                        _env(aws_env, {"AWS_ENDPOINT_URL_SQS": endpoint}))
    assert_one_line_error(result, "cannot reach SQS", endpoint)


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """A TCP port that accepts connections but never answers a byte."""
    with silent_server() as address:
        yield f"http://{address}"


def test_endpoint_never_answers(run_poller: RunPoller, aws_env: Mapping[str, str], queue_url: str,
                                silent_endpoint: str) -> None:
    # Bounded by the SQS client's deadline (10 s): a hang fails the test at pytest's timeout.
    result = run_poller(["run", "--queue-url", queue_url, "--sink", SINK, "--endpoint-url", silent_endpoint],
                        _env(aws_env))
    assert_one_line_error(result, "cannot reach SQS")


def test_no_credentials(run_poller: RunPoller, aws_env: Mapping[str, str], queue_url: str, tmp_path: Path) -> None:
    empty_credentials = tmp_path / "credentials"
    empty_config = tmp_path / "config"
    empty_credentials.write_text("")
    empty_config.write_text("")
    env = _env(
        aws_env,
        {
            "AWS_SHARED_CREDENTIALS_FILE": str(empty_credentials),
            "AWS_CONFIG_FILE": str(empty_config),
            "AWS_EC2_METADATA_DISABLED": "true",
            "HOME": str(tmp_path),  # no ~/.aws of the user's, no SSO cache
        },
        drop=["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"],
    )
    assert not any(k.startswith(("AWS_CONTAINER_", "AWS_WEB_IDENTITY")) for k in env)
    result = run_poller(["run", "--queue-url", queue_url, "--sink", SINK], env)
    assert_one_line_error(result, "credentials")


def test_unknown_profile(run_poller: RunPoller, aws_env: Mapping[str, str], queue_url: str, tmp_path: Path) -> None:
    (tmp_path / "config").write_text("")
    env = _env(aws_env, {"AWS_CONFIG_FILE": str(tmp_path / "config"),
                         "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "config")})
    result = run_poller(["run", "--queue-url", queue_url, "--sink", SINK, "--profile", "nosuchprofile"], env)
    assert_one_line_error(result, "nosuchprofile")


# -- help ----------------------------------------------------------------------------------------


def _option_blocks(help_text: str) -> dict[str, str]:
    """--long-name -> its whole entry in ``--help`` (whitespace normalised), in whichever of the
    help's sections it is listed."""
    blocks: dict[str, str] = {}
    current: list[str] = []
    for line in help_text.splitlines():
        if re.match(r"^  -", line) or not line.startswith(" "):  # an entry, or a section's title or end
            if current:
                _store(blocks, current)
            current = [line] if line.startswith("  -") else []
        elif current:
            current.append(line)
    if current:
        _store(blocks, current)
    return blocks


def _store(blocks: dict[str, str], lines: list[str]) -> None:
    name = re.search(r"--[a-z][a-z0-9-]*", lines[0])
    if name:
        blocks[name.group(0)] = " ".join(" ".join(lines).split())


def _no_default(value: object) -> bool:
    # click >= 8.3 says "no default" with its own UNSET sentinel
    return value is None or value == () or value is False or type(value).__name__ == "Sentinel"


def test_run_help_lists_every_flag_with_env_var_and_default(run_poller: RunPoller, aws_env: Mapping[str, str]) -> None:
    from poller.cli import run as run_command

    result = run_poller(["run", "--help"], _env(aws_env))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    help_text = result.stdout
    flat = " ".join(help_text.split())
    for name in ("POLLER_QUEUE_URL", "K_SINK", "POLLER_BATCH_SIZE", "POLLER_SINK", "AWS_REGION"):
        assert name in flat, name
    assert re.search(r"POLLER_BATCH_SIZE; default: 10\b", flat)
    assert re.search(r"POLLER_WAIT_TIME; default: 20\b", flat)
    blocks = _option_blocks(help_text)
    options = [p for p in run_command.params if isinstance(p, click.Option) and p.name != "help"]
    assert len(options) >= 30
    ctx = click.Context(run_command)
    for param in options:
        long_name = next(o for o in param.opts if o.startswith("--"))
        assert long_name in blocks, f"{long_name} missing from --help"
        block = blocks[long_name]
        envvars = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar or ())
        assert envvars, f"{long_name} has no env var"
        for envvar in envvars:
            assert envvar in block, f"{envvar} not in the help of {long_name}: {block!r}"
        if param.required:
            assert "required" in block, block
        elif not _no_default(param.get_default(ctx, call=True)):
            assert "default" in block, f"{long_name} has a default but --help does not say it: {block!r}"


def test_metrics_port_taken(run_poller: RunPoller, aws_env: Mapping[str, str], queue_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = run_poller(["run", "--queue-url", queue_url, "--sink", SINK, "--metrics-port", str(port)],
                            _env(aws_env))
    line = assert_one_line_error(result, "cannot serve", str(port))
    assert result.returncode == 3, line


# -- end to end: the console script itself -------------------------------------------------------


@pytest.mark.parametrize("case", ["bad-flag", "missing-queue", "help"])
def test_the_console_script_end_to_end(aws_env: Mapping[str, str], queue_url: str, case: str) -> None:
    missing = queue_url.rsplit("/", 1)[0] + f"/no-such-queue-{uuid.uuid4().hex[:8]}"
    argv = {
        "bad-flag": ["run", "--queue-url", queue_url, "--sink", SINK, "--batch-size", "0"],
        "missing-queue": ["run", "--queue-url", missing, "--sink", SINK],
        "help": ["run", "--help"],
    }[case]
    result = run_poller_process(argv, _env(aws_env))
    if case == "help":
        assert result.returncode == 0 and "--queue-url" in result.stdout and result.stderr == ""
        return
    assert_one_line_error(result, "--batch-size" if case == "bad-flag" else "does not exist")
    assert result.returncode == (2 if case == "bad-flag" else 3)


# -- permissions proven at start: sqs:DeleteMessage, sqs:ChangeMessageVisibility -----------------


def _sqs_refusal(status: int, code: str, message: str) -> CannedResponse:
    """A canned SQS JSON-protocol error (the shape the fault proxy gives SQS's own)."""
    body = orjson.dumps({"__type": f"com.amazon.coral.service#{code}", "message": message})
    reason = {400: "Bad Request", 403: "Forbidden", 500: "Internal Server Error"}[status]
    return CannedResponse(status, reason, body, (
        ("Content-Type", "application/x-amz-json-1.0"), ("x-amzn-query-error", f"{code};Sender")))


def _not_authorized(permission: str) -> str:
    # IAM's wording (it lowercases the action)
    return (f"User: arn:aws:sts::123456789012:assumed-role/poller/i-0abc is not authorized to perform: "
            f"{permission.lower()} on resource: arn:aws:sqs:us-east-1:000000000000:q because no "
            f"identity-based policy allows the {permission.lower()} action")


def test_check_proves_each_permission_and_leaves_the_queue_as_it_was(
    run_poller: RunPoller, aws_env: Mapping[str, str], sqs: Any, make_queue: Any
) -> None:
    from poller.kit.dumper import DumperServer

    queue = make_queue(visibility_timeout=30)
    send_messages(sqs, queue.url, ["a", "b", "c"])
    held = sqs.receive_message(QueueUrl=queue.url, MaxNumberOfMessages=1, VisibilityTimeout=300)["Messages"][0]
    with open(os.devnull, "w") as devnull, DumperServer("127.0.0.1", 0, out=devnull) as sink:
        result = run_poller(["check", "--queue-url", queue.url, "--sink", sink.url], _env(aws_env))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for permission in ("sqs:GetQueueAttributes", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility"):
        assert sum(line.startswith(f"ok       permission: {permission} ") for line in lines) == 1, result.stdout
    # The made-up receipt handles touched no message: two visible, the held one still held and
    # its handle still good.
    assert queue_counts(sqs, queue.url) == (2, 1)
    sqs.delete_message(QueueUrl=queue.url, ReceiptHandle=held["ReceiptHandle"])
    assert queue_counts(sqs, queue.url) == (2, 0)


@pytest.mark.parametrize("command", ["run", "check"])
@pytest.mark.parametrize(("action", "permission", "code"), [
    ("DeleteMessageBatch", "sqs:DeleteMessage", "AccessDenied"),
    ("ChangeMessageVisibilityBatch", "sqs:ChangeMessageVisibility", "AccessDeniedException"),
])
def test_a_permission_the_credentials_lack_is_one_line_and_exit_3(
    run_poller: RunPoller, aws_env: Mapping[str, str], sqs_endpoint: str, queue_url: str,
    command: str, action: str, permission: str, code: str,
) -> None:
    """SQS in front of which a proxy refuses one action as IAM would (LocalStack enforces no IAM)."""
    refusal = _sqs_refusal(403, code, _not_authorized(permission))
    with FaultProxy(sqs_endpoint, http=True) as proxy:
        proxy.set(HttpError(refusal, actions=frozenset({action})))
        result = run_poller([command, "--queue-url", queue_url, "--sink", SINK, "--endpoint-url", proxy.url],
                            _env(aws_env))
        stats = proxy.stats()
    line = assert_one_line_error(result, f"the credentials may not {permission} on {queue_url}", code,
                                 "is not authorized")
    assert result.returncode == 3, line
    assert stats.canned[action] == 1 and stats.requests["GetQueueAttributes"] == 1


def test_a_refusal_of_the_call_itself_still_proves_the_permission(
    run_poller: RunPoller, aws_env: Mapping[str, str], sqs_endpoint: str, queue_url: str
) -> None:
    """Any answer of SQS's own about the request (here InvalidParameterValue for the whole call)
    comes after its authorization: allowed."""
    from poller.kit.dumper import DumperServer

    refusal = _sqs_refusal(400, "InvalidParameterValue", "Value for parameter ReceiptHandle is invalid.")
    with FaultProxy(sqs_endpoint, http=True) as proxy, open(os.devnull, "w") as devnull, \
            DumperServer("127.0.0.1", 0, out=devnull) as sink:
        proxy.set(HttpError(refusal, actions=frozenset({"DeleteMessageBatch"})))
        result = run_poller(["check", "--queue-url", queue_url, "--sink", sink.url, "--endpoint-url", proxy.url],
                            _env(aws_env))
        assert proxy.stats().canned["DeleteMessageBatch"] == 1
    assert result.returncode == 0, result.stderr
    assert "ok       permission: sqs:DeleteMessage " in result.stdout


@pytest.mark.parametrize(("status", "code"), [(500, "InternalFailure"), (400, "RequestThrottled")])
def test_an_answer_that_proves_nothing_fails_the_start_in_one_line(
    run_poller: RunPoller, aws_env: Mapping[str, str], sqs_endpoint: str, queue_url: str, status: int, code: str
) -> None:
    with FaultProxy(sqs_endpoint, http=True) as proxy:
        proxy.set(HttpError(_sqs_refusal(status, code, "try again"),
                            actions=frozenset({"ChangeMessageVisibilityBatch"})))
        result = run_poller(["run", "--queue-url", queue_url, "--sink", SINK, "--endpoint-url", proxy.url],
                            _env(aws_env))
    assert_one_line_error(result, "cannot check sqs:ChangeMessageVisibility", code)
    assert result.returncode == 3


def test_a_queue_the_credentials_may_not_read_is_named_in_one_line(
    run_poller: RunPoller, aws_env: Mapping[str, str], sqs_endpoint: str, queue_url: str
) -> None:
    with FaultProxy(sqs_endpoint, http=True) as proxy:
        proxy.set(HttpError(_sqs_refusal(403, "AccessDenied", _not_authorized("sqs:GetQueueAttributes")),
                            actions=frozenset({"GetQueueAttributes"})))
        result = run_poller(["check", "--queue-url", queue_url, "--sink", SINK, "--endpoint-url", proxy.url],
                            _env(aws_env))
    assert_one_line_error(result, f"the credentials may not sqs:GetQueueAttributes on {queue_url}", "AccessDenied")
    assert result.returncode == 3


@pytest.mark.parametrize(("args", "expected"), [
    (["--sink", SINK, "--http-timeout", "400"], ["--max-processing-time 300", "--http-timeout"]),
    (["--channel", "kafka", "--kafka-bootstrap-servers", "127.0.0.1:9", "--kafka-topic", "t",
      "--kafka-config", "message.timeout.ms=200000"], ["--max-processing-time 300", "twice message.timeout.ms"]),
    (["--sink", SINK, "--stats-interval", "nan"], ["--stats-interval", "a number"]),
])
def test_bounds_that_need_no_queue_are_usage_errors_before_sqs_is_asked(
    run_poller: RunPoller, args: list[str], expected: list[str],
) -> None:
    """Checked before the queue: an unreachable endpoint and a queue that does not exist must not
    hide them (exit 2, the flag named), and each names its own channel's deadline."""
    env = _env({"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1"})
    result = run_poller(["run", "--queue-url", "http://127.0.0.1:9/000000000000/missing",
                         "--endpoint-url", "http://127.0.0.1:9", *args], env)
    assert_one_line_error(result, *expected)
    assert result.returncode == 2
