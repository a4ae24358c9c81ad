"""poller.options (one declaration per option), poller.cpus (processes that fit the container),
the README's flag table, which must be exactly what the declarations make, and the sections of
``poller run --help`` and ``poller check --help`` made from them."""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from channels.http import HttpConfig
from channels.registry import load_channels
from poller.config import MAX_IN_FLIGHT, RunConfig, WorkerConfig
from poller.cpus import cpu_quota, default_processes
from poller.options import POLLER_OPTIONS, RUN_OPTIONS, group_of, markdown_table, option, run_options
from poller.sqs import SqsTarget

README = Path(__file__).resolve().parent.parent / "README.md"
TARGET = SqsTarget(queue_url="http://127.0.0.1:9/000000000000/q", region="us-east-1", endpoint_url="http://127.0.0.1:9")


def test_the_readme_table_is_the_one_the_declarations_make() -> None:
    text = README.read_text()
    table = re.search(r"<!-- options:start -->\n(.*?)\n<!-- options:end -->", text, re.S)
    assert table, "the README lost its options markers"
    assert table.group(1) == markdown_table(), "README out of date: paste `python -m poller.options`"


def test_every_declared_option_is_a_flag_of_run_with_its_env_var() -> None:
    from poller.cli import check, run

    for command in (run, check):
        params = {p.name: p for p in command.params if isinstance(p, click.Option)}
        for o in RUN_OPTIONS:
            param = params[o.name]
            assert o.flag in param.opts
            assert o.env in param.envvar


def _sections(command: str) -> dict[str, list[str]]:
    """The sections of ``poller COMMAND --help``: title -> the long flags listed under it, in order."""
    from poller.cli import cli

    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0, result.output
    sections: dict[str, list[str]] = {}
    title = ""
    for line in result.output.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            title = line[:-1]
            sections[title] = []
        elif title and line.startswith("  -"):
            flag = next((w for w in line.split() if w.startswith("--")), None)
            if flag:
                sections[title].append(flag.rstrip(","))
    return {t: flags for t, flags in sections.items() if flags}  # not the epilog's "Examples:"


def test_every_option_of_the_poller_is_in_a_section() -> None:
    assert all(o.group for o in POLLER_OPTIONS), [o.flag for o in POLLER_OPTIONS if not o.group]


def test_run_help_lists_the_options_by_section_in_the_declared_order() -> None:
    sections = _sections("run")
    expected: dict[str, list[str]] = {}
    for o in RUN_OPTIONS:
        expected.setdefault(group_of(o), []).append(o.flag)
    assert list(sections)[:4] == ["SQS", "Delivery", "Events", "With --channel http"]
    assert list(sections)[-2:] == ["Operations", "Other options"]  # --help last
    assert {t: f for t, f in sections.items() if t != "Other options"} == expected


def test_check_help_lists_only_what_check_uses_and_takes_every_flag_of_run() -> None:
    from poller.cli import check

    listed = {f for flags in _sections("check").values() for f in flags}
    assert listed == {o.flag for o in RUN_OPTIONS if not o.run_only} | {"--help"}
    assert {"--queue-url", "--sink", "--kafka-topic", "--retries", "--log-format"} <= listed
    assert not {"--batch-size", "--metrics-port", "--until-empty", "--envelope", "--http-mode"} & listed
    # a run's command line is checked as it is: a run-only flag is taken, and held to its range
    ctx = check.make_context("check", ["--queue-url", "http://127.0.0.1:9/000000000000/q", "--batch-size", "5"])
    assert ctx.params["batch_size"] == 5
    with pytest.raises(click.BadParameter, match="not in the range 1<=x<=10"):
        check.make_context("check", ["--queue-url", "http://127.0.0.1:9/000000000000/q", "--batch-size", "11"])


@pytest.mark.parametrize(("field", "value", "flag"), [
    ("batch_size", 11, "--batch-size"), ("wait_time", 21, "--wait-time"), ("receivers", 0, "--receivers"),
    ("max_processing_time", 0, "--max-processing-time"), ("retries", 101, "--retries"),
])
def test_the_config_is_held_to_the_declared_ranges(field: str, value: int, flag: str) -> None:
    o = option(flag)
    with pytest.raises(ValueError, match=f"{flag} must be between {o.low:g} and {o.high:g}"):
        WorkerConfig(target=TARGET, channel=HttpConfig(sink="http://127.0.0.1:9/"), **{field: value})


def test_the_run_config_too() -> None:
    worker = WorkerConfig(target=TARGET, channel=HttpConfig(sink="http://127.0.0.1:9/"))
    with pytest.raises(ValueError, match="--processes must be between 1 and 256"):
        RunConfig(worker=worker, processes=0)
    with pytest.raises(ValueError, match="--shutdown-timeout must be between 1 and 3600"):
        RunConfig(worker=worker, shutdown_timeout=0.5)
    with pytest.raises(ValueError, match="--max-duration must be at least 1"):
        RunConfig(worker=worker, max_duration=0.5)


_SINK = ["--sink", "http://127.0.0.1:9/"]
_KAFKA = ["--channel", "kafka", "--kafka-bootstrap-servers", "127.0.0.1:9", "--kafka-topic", "t"]


@pytest.mark.parametrize(("args", "env", "held"), [
    (_SINK, {}, 200),
    (_KAFKA, {}, 400),  # the channel's own room (ChannelPlugin.max_in_flight)
    ([*_KAFKA, "--max-in-flight", "150"], {}, 150),
    (_KAFKA, {"POLLER_MAX_IN_FLIGHT": "300"}, 300),
])
def test_max_in_flight_defaults_to_the_channels_room(args: list[str], env: dict[str, str], held: int,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from poller.boot import make_plan
    from poller.cli import CHANNELS, run

    for name in [n for n in os.environ if n.startswith("POLLER_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    argv = ["--queue-url", TARGET.queue_url, "--endpoint-url", TARGET.endpoint_url, *args]
    with run.make_context("run", argv) as ctx:
        plan = make_plan(dict(ctx.params), CHANNELS, reach_queue=False)
    assert plan.config.worker.max_in_flight == held


def test_the_default_text_of_max_in_flight_is_the_poller_s_and_each_channel_s() -> None:
    from channels.kafka.plugin import CHANNEL

    assert option("--max-in-flight").shown_default() == str(MAX_IN_FLIGHT)
    shown = {o.flag: o.shown_default() for o in RUN_OPTIONS}
    assert CHANNEL.max_in_flight is not None
    assert shown["--max-in-flight"] == f"{MAX_IN_FLIGHT}; the kafka channel's {CHANNEL.max_in_flight}"
    # a channel from another distribution that declares its own room shows it too
    own = load_channels(POLLER_OPTIONS)
    roomy = replace(own.channels["http"], name="roomy", max_in_flight=50)
    registry = replace(own, channels={**own.channels, "roomy": roomy})
    shown = {o.flag: o.shown_default() for o in run_options(registry)}
    assert shown["--max-in-flight"].endswith("; the roomy channel's 50")


# -- processes that fit the container -------------------------------------------------------------


def _cgroup(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


@pytest.mark.parametrize(("files", "quota"), [
    ({"cpu.max": "50000 100000\n"}, 0.5),  # cgroup v2, 500m
    ({"cpu.max": "250000 100000\n"}, 2.5),
    ({"cpu.max": "max 100000\n"}, None),  # no limit
    ({"cpu/cpu.cfs_quota_us": "150000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1.5),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_cpu_quota(tmp_path: Path, files: dict[str, str], quota: float | None) -> None:
    assert cpu_quota(_cgroup(tmp_path, files)) == quota


def test_a_quota_below_the_cpus_decides_rounded_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)))  # a big node
    n, why = default_processes(_cgroup(tmp_path, {"cpu.max": "50000 100000"}))
    assert n == 1 and "quota is 0.5" in why  # a 500m sidecar: one worker, not 64
    n, _ = default_processes(_cgroup(tmp_path, {"cpu.max": "250000 100000"}))
    assert n == 3


def test_without_a_quota_the_usable_cpus_decide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    assert default_processes(_cgroup(tmp_path, {"cpu.max": "max 100000"}))[0] == 2
    assert default_processes(_cgroup(tmp_path, {"cpu.max": "800000 100000"}))[0] == 2  # affinity is less
