"""The image, built with ``make image`` and run locked down (read-only root filesystem, no
capabilities, no new privileges, the host's network): ``--help``, the locked versions, ``poller
check`` and ``poller run`` against LocalStack and a local sink, the HEALTHCHECK, and SIGTERM ->
a drain and exit 0. ``make image-smoke`` runs this file.

Skipped, with the reason, where no engine can build and run it (no Docker daemon and no
buildah/podman, no base image and no registry to pull it from, a runtime that cannot start a
container): see :func:`image_smoke.find_engine`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest

from poller.kit.dumper import DumperServer

from image_smoke import (
    ROOT,
    Engine,
    Unavailable,
    find_engine,
    locked_versions,
    make_image,
    normalize,
    wait_until_healthy,
)
from support import free_port, queue_counts, send_messages, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("image")]

TAG = "sqs-poller:test"
DISTRIBUTION = "sqs-cloudevents-poller"
# uid, gid and the user's name in /etc/passwd (raises where the uid has none)
WHOAMI = "import os, pwd; print(os.getuid(), os.getgid(), pwd.getpwuid(os.getuid()).pw_name)"


@pytest.fixture(scope="module")
def engine() -> Engine:
    try:
        return find_engine()
    except Unavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def image(engine: Engine) -> str:
    make_image(TAG)
    return TAG


@pytest.fixture
def sink() -> Iterator[DumperServer]:
    with open(os.devnull, "w") as devnull, DumperServer("127.0.0.1", 0, out=devnull, keep=True) as server:
        yield server


def test_help_runs_locked_down_as_the_image_user(engine: Engine, image: str) -> None:
    result = engine.run(image, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: poller"), result.stdout[:500]
    whoami = engine.run(image, "-c", WHOAMI, entrypoint="python")
    assert whoami.stdout.split() == ["10001", "10001", "poller"], whoami.stdout + whoami.stderr


def test_build_arg_uid_is_the_user_it_runs_as(engine: Engine, image: str) -> None:
    """``--build-arg UID=2000``: the passwd entry and USER both follow it (USER was a literal 10001)."""
    tag = f"{TAG}-uid2000"
    make_image(tag, "--build-arg", "UID=2000")
    try:
        whoami = engine.run(tag, "-c", WHOAMI, entrypoint="python")
        assert whoami.stdout.split() == ["2000", "2000", "poller"], whoami.stdout + whoami.stderr
    finally:
        engine.remove_image(tag)


def test_image_has_exactly_the_locked_versions(engine: Engine, image: str) -> None:
    listing = engine.run(image, "-c", "import importlib.metadata as m, json; "
                         "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))",
                         entrypoint="python")
    assert listing.returncode == 0, listing.stderr
    installed = {normalize(name): version for name, version in json.loads(listing.stdout).items()}
    assert installed.pop(DISTRIBUTION, None), f"{DISTRIBUTION} is not installed in the image"
    assert installed == locked_versions(ROOT / "requirements-msk.lock")


def test_check_then_run_delivers_is_healthy_and_drains_on_sigterm(
    engine: Engine, image: str, sqs: Any, make_queue: Any, aws_env: dict[str, str], sink: DumperServer,
) -> None:
    queue = make_queue(visibility_timeout=60, dlq_max_receive_count=5)
    # The host's network: a port of its own, not the image's 8081, which something else may hold.
    env = {**aws_env, "POLLER_HEALTH_PORT": str(free_port())}

    check = engine.run(image, "check", "--queue-url", queue.url, "--sink", sink.url, env=env)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"ok       queue: {queue.url}" in check.stdout and "ok       sink: " in check.stdout, check.stdout

    args = ("run", "--queue-url", queue.url, "--sink", sink.url, "--processes", "2", "--wait-time", "1",
            "--shutdown-timeout", "20")
    with engine.started(image, *args, env=env) as container:
        ids = send_messages(sqs, queue.url, [f"message {i}" for i in range(40)])
        assert sink.wait_for(len(ids), timeout=90), \
            f"{len(sink.events)} of {len(ids)} events at the sink; logs:\n{container.logs()[-3000:]}"
        assert sorted(e["id"] for e in sink.events) == sorted(ids)
        wait_until_healthy(container, timeout=60)

        # More messages, then SIGTERM while they are on their way: the drain delivers or gives back.
        late = send_messages(sqs, queue.url, [f"late {i}" for i in range(20)])
        code = container.terminate(timeout=60)
        logs = container.logs()
    assert code == 0, f"exit {code} after SIGTERM; logs:\n{logs[-3000:]}"
    assert "Traceback" not in logs, logs[-3000:]
    # Nothing held back: what reached the sink was deleted, the rest is visible again.
    delivered = {e["id"] for e in sink.events}
    wait_until(lambda: queue_counts(sqs, queue.url) == (len(set(late) - delivered), 0), 30,
               "the queue holds just the undelivered late messages, none in flight")

