"""Channels as plugins (``channels.registry``): the built-in ones come through the same entry
points as any other, a channel of another distribution works without touching the poller
(examples/jsonl-channel, installed here and run end to end against LocalStack), and a broken
or conflicting one is one line, never a traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import orjson
import pytest

from channels.options import Option
from channels.plugin import ChannelPlugin
from channels.registry import BUILTIN, GROUP, load_channels
from poller.options import POLLER_OPTIONS, markdown_table, run_options

from support import queue_counts, send_messages

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "jsonl-channel"
POLLER = str(Path(sys.executable).with_name("poller"))
_SCRUBBED_PREFIXES = ("POLLER_", "K_SINK", "K_CE_OVERRIDES", "AWS_", "KAFKA_", "PYTHONPATH")


def _env(extra: Mapping[str, str] | None = None, path: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_PREFIXES)}
    env.update(extra or {})
    if path is not None:
        env["PYTHONPATH"] = str(path)
    return env


def _poller(args: list[str], env: Mapping[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([POLLER, *args], env=dict(env), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def _one_line(result: subprocess.CompletedProcess[str], *expected: str) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


# -- the registry -----------------------------------------------------------------------------------


def test_the_builtin_channels_are_registered_as_the_fallback_says() -> None:
    """pyproject.toml's entry points and channels.registry.BUILTIN (a source tree's fallback) agree."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["entry-points"][GROUP] == BUILTIN
    installed = load_channels(POLLER_OPTIONS)
    assert list(installed.channels)[:2] == ["http", "kafka"] and installed.builtin == {"http", "kafka"}
    from_fallback = load_channels(POLLER_OPTIONS, found=[])
    assert list(from_fallback.channels) == ["http", "kafka"] and not from_fallback.problems


def test_finding_the_channels_imports_no_kafka_client() -> None:
    code = "import sys, poller.cli; print('confluent_kafka' in sys.modules, sorted(poller.cli.CHANNELS.channels))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=_env()).stdout
    assert out.split(" ", 1)[0] == "False", out


def _point(name: str, value: str) -> EntryPoint:
    return EntryPoint(name, value, GROUP)  # no distribution: another one's, as far as the registry knows


GOOD = ChannelPlugin(name="good", options=(Option(flag="--good-path", help="good: a path."),),
                     build=lambda context: None, deadline="none")  # type: ignore[arg-type, return-value]
NOT_A_PLUGIN = object()
WRONG_NAME = ChannelPlugin(name="other", options=(), build=lambda c: None, deadline="")  # type: ignore[arg-type, return-value]
TAKES_A_POLLER_FLAG = ChannelPlugin(name="greedy", options=(Option(flag="--batch-size", help="mine"),),
                                    build=lambda c: None, deadline="")  # type: ignore[arg-type, return-value]
TAKES_AN_HTTP_ENV = ChannelPlugin(name="sneaky", options=(Option(flag="--sneaky-sink", envvars=("K_SINK",), help="x"),),
                                  build=lambda c: None, deadline="")  # type: ignore[arg-type, return-value]


@pytest.mark.parametrize(("point", "expected"), [
    (_point("broken", "no_such_module_anywhere:CHANNEL"),
     "cannot import no_such_module_anywhere:CHANNEL: ModuleNotFoundError"),
    (_point("notone", f"{__name__}:NOT_A_PLUGIN"), "is a object, not a channels.plugin.ChannelPlugin"),
    (_point("good", f"{__name__}:WRONG_NAME"), "is named 'other', not 'good'"),
    (_point("greedy", f"{__name__}:TAKES_A_POLLER_FLAG"), "--batch-size takes --batch-size, which the poller has"),
    (_point("sneaky", f"{__name__}:TAKES_AN_HTTP_ENV"), "takes K_SINK, which the http channel has"),
    (_point("Bad Name", f"{__name__}:GOOD"), "a channel's name is lower-case"),
])
def test_an_unusable_channel_is_left_out_with_one_line(point: EntryPoint, expected: str) -> None:
    registry = load_channels(POLLER_OPTIONS, found=[point])
    assert point.name not in registry.channels and {"http", "kafka"} <= set(registry.channels)
    why = registry.problems[point.name]
    assert expected in why and "\n" not in why, why
    with pytest.raises(LookupError, match="cannot be used"):
        registry.get(point.name)
    assert point.name in registry.names()  # --channel takes it, to say why it cannot be used


def test_a_channel_named_twice_is_used_by_neither_and_the_builtin_name_stays_the_builtin() -> None:
    found = [_point("good", f"{__name__}:GOOD"), _point("good", f"{__name__}:GOOD"), _point("http", f"{__name__}:GOOD")]
    registry = load_channels(POLLER_OPTIONS, found=found)
    assert "good" not in registry.channels and "registered by" in registry.problems["good"]
    assert registry.channels["http"].options[0].flag == "--sink"
    assert any("is the poller's own channel" in w for w in registry.warnings())


def test_a_good_channel_gets_its_options_stamped_and_the_readme_table_ignores_it() -> None:
    registry = load_channels(POLLER_OPTIONS, found=[_point("good", f"{__name__}:GOOD")])
    assert registry.get("good").options[0].channel == "good"
    flags = [o.flag for o in run_options(registry)]
    assert flags.index("--good-path") > flags.index("--kafka-replication")
    assert "--good-path" not in markdown_table(run_options(registry.own()))


def _fake_distribution(site: Path, name: str, points: Mapping[str, str], module: str = "") -> None:
    """A distribution as pip leaves it (a dist-info with its entry points), without building one."""
    info = site / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{GROUP}]\n" + "".join(f"{k} = {v}\n" for k, v in points.items()))
    if module:
        (site / f"{name}.py").write_text(module)


def test_a_broken_plugin_is_one_line_when_chosen_and_does_not_break_the_others(tmp_path: Path) -> None:
    _fake_distribution(tmp_path, "broken_channel", {"broken": "broken_channel:CHANNEL"},
                       module="raise RuntimeError('this plugin is broken\\nsecond line')\n")
    env = _env(path=tmp_path)
    result = _poller(["run", "--help"], env)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert "[http|kafka|broken]" in result.stdout
    result = _poller(["run", "--queue-url", "http://127.0.0.1:9/000000000000/q", "--channel", "broken"], env)
    line = _one_line(result, "channel 'broken' of broken_channel 1.0 cannot be used",
                     "RuntimeError: this plugin is broken")
    assert result.returncode == 3, line


# -- a channel of another distribution, installed and run ----------------------------------------


@pytest.fixture(scope="module")
def jsonl_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/jsonl-channel installed with pip into a directory of its own (put on PYTHONPATH by
    the tests that use it), as a user installs it next to the poller: the test venv stays as it
    is. Built from a copy (setuptools writes build/ and *.egg-info next to the sources) with the
    venv's setuptools: no download."""
    work = tmp_path_factory.mktemp("jsonl")
    source = shutil.copytree(EXAMPLE, work / "source")
    site = work / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(source)], check=True, capture_output=True, timeout=120)
    assert (site / "sqs_poller_jsonl_channel-0.1.0.dist-info" / "entry_points.txt").exists()
    return site


def test_the_installed_channel_is_a_choice_with_its_flags(jsonl_site: Path) -> None:
    result = _poller(["run", "--help"], _env(path=jsonl_site))
    assert result.returncode == 0, result.stderr
    assert "[http|kafka|jsonl]" in result.stdout and "POLLER_JSONL_PATH" in result.stdout
    result = _poller(["run", "--help"], _env())
    assert "jsonl" not in result.stdout


def test_a_flag_of_the_installed_channel_with_another_channel_is_an_error(jsonl_site: Path) -> None:
    result = _poller(["run", "--queue-url", "http://127.0.0.1:9/000000000000/q", "--sink", "http://127.0.0.1:9/",
                      "--jsonl-path", "x"], _env(path=jsonl_site))
    _one_line(result, "--jsonl-path is a flag of the jsonl channel", "--channel jsonl")
    assert result.returncode == 2


@pytest.mark.integration
def test_the_jsonl_channel_end_to_end(jsonl_site: Path, sqs: Any, make_queue: Any, aws_env: dict[str, str],
                                      tmp_path: Path) -> None:
    queue = make_queue(visibility_timeout=30)
    ids = send_messages(sqs, queue.url, [orjson.dumps({"n": i}).decode() for i in range(50)])
    out = tmp_path / "events.jsonl"
    result = _poller(["run", "--queue-url", queue.url, "--channel", "jsonl", "--jsonl-path", str(out),
                      "--processes", "2", "--until-empty"], _env(aws_env, path=jsonl_site))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "-> jsonl channel file " in result.stderr
    events = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert sorted(e["id"] for e in events) == sorted(ids)  # each message once: nothing lost, no copy
    assert all(e["type"] == "aws.sqs.message" and e["source"] == queue.url for e in events)
    assert sorted(e["data"]["Body"] for e in events) == sorted(orjson.dumps({"n": i}).decode() for i in range(50))
    assert queue_counts(sqs, queue.url) == (0, 0)


@pytest.mark.integration
def test_check_with_the_installed_channel_starts_it(jsonl_site: Path, queue_for_check: str,
                                                    aws_env: dict[str, str], tmp_path: Path) -> None:
    result = _poller(["check", "--queue-url", queue_for_check, "--channel", "jsonl", "--jsonl-path",
                      str(tmp_path / "x.jsonl")], _env(aws_env, path=jsonl_site))
    assert result.returncode == 0, result.stderr
    assert "ok       jsonl: the channel started and closed" in result.stdout
    result = _poller(["check", "--queue-url", queue_for_check, "--channel", "jsonl", "--jsonl-path",
                      str(tmp_path / "no" / "such" / "dir.jsonl")], _env(aws_env, path=jsonl_site))
    _one_line(result, "jsonl channel: cannot open")
    assert result.returncode == 3


@pytest.fixture
def queue_for_check(make_queue: Any) -> Iterator[str]:
    yield make_queue(visibility_timeout=30).url
