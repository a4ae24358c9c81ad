"""The project's image, built with ``make image`` and run the way a cluster runs it: a read-only
root filesystem, no capabilities, no new privileges. Helpers for tests/test_image.py (``make
image-smoke``).

The engine is the one ``make image`` picks: Docker where a daemon answers, else buildah to build
and podman to run (they share one image store). Where there is neither, or the Dockerfile's base
image can be neither found nor pulled, or the engine cannot start even the base image,
:func:`find_engine` raises :class:`Unavailable` with the reason, and the tests skip saying it.
Containers use the host's network: LocalStack and the sinks the tests start listen on 127.0.0.1.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"

# What Kubernetes' securityContext in deploy/ asks (readOnlyRootFilesystem, drop ALL,
# allowPrivilegeEscalation false), with the host's network.
LOCKDOWN = ("--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--network", "host")
# podman's --read-only mounts writable tmpfs on /tmp, /var/tmp and /run unless told not to;
# Docker's and Kubernetes' do not.
PODMAN_LOCKDOWN = ("--read-only-tmpfs=false",)


class Unavailable(Exception):
    """No engine here can build and run the image; the message says why."""


def _run(argv: Sequence[str], timeout: float = 60, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=check)


def _last_line(result: subprocess.CompletedProcess[str]) -> str:
    """What a failed command said last: its error output's last line, else its output's."""
    for text in (result.stderr, result.stdout):
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if lines:
            return lines[-1]
    return f"exit {result.returncode}"


def base_images(dockerfile: Path = DOCKERFILE) -> list[str]:
    """The images the Dockerfile's stages start FROM (not its own earlier stages)."""
    stages: set[str] = set()
    images = []
    for line in dockerfile.read_text().splitlines():
        m = re.match(r"\s*FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if m:
            if m.group(1) not in stages and m.group(1) not in images:
                images.append(m.group(1))
            if m.group(2):
                stages.add(m.group(2))
    return images


@dataclass(frozen=True)
class Engine:
    """The command that runs containers: ``docker`` or ``podman``."""

    cli: str

    def lockdown(self) -> tuple[str, ...]:
        return LOCKDOWN + (PODMAN_LOCKDOWN if self.cli == "podman" else ())

    def has_image(self, image: str) -> bool:
        return _run([self.cli, "image", "inspect", image]).returncode == 0

    def remove_image(self, image: str) -> None:
        _run([self.cli, "image", "rm", image])

    def run(self, image: str, *args: str, env: Mapping[str, str] | None = None, entrypoint: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``run --rm`` locked down, to completion."""
        return _run(self._run_argv(image, args, env, entrypoint, ["--rm"]), timeout=timeout)

    @contextmanager
    def started(self, image: str, *args: str, env: Mapping[str, str] | None = None) -> Iterator[Container]:
        """``run --detach`` locked down; removed (forcibly if still running) on the way out."""
        name = f"sqs-poller-test-{uuid.uuid4().hex[:10]}"
        # Docker runs the HEALTHCHECK on its own schedule: every second here, not every 30 s.
        schedule = ["--health-interval", "1s"] if self.cli == "docker" else []
        _run(self._run_argv(image, args, env, None, ["--detach", "--name", name, *schedule]), check=True)
        try:
            yield Container(self, name)
        finally:
            _run([self.cli, "rm", "--force", name])

    def _run_argv(self, image: str, args: Sequence[str], env: Mapping[str, str] | None, entrypoint: str | None,
                  extra: Sequence[str]) -> list[str]:
        argv = [self.cli, "run", *extra, *self.lockdown()]
        for key, value in (env or {}).items():
            argv += ["--env", f"{key}={value}"]
        if entrypoint:
            argv += ["--entrypoint", entrypoint]
        return [*argv, image, *args]


@dataclass(frozen=True)
class Container:
    engine: Engine
    name: str

    def logs(self) -> str:
        result = _run([self.engine.cli, "logs", self.name])
        return result.stdout + result.stderr

    def healthy(self) -> bool:
        """The image's HEALTHCHECK, run now: podman runs it on demand; Docker runs it on its
        schedule (the test shortens it with --health-interval), so ask its last verdict."""
        if self.engine.cli == "podman":
            return _run(["podman", "healthcheck", "run", self.name]).returncode == 0
        state = _run(["docker", "inspect", "--format", "{{json .State.Health}}", self.name])
        health = json.loads(state.stdout) if state.returncode == 0 and state.stdout.strip() else None
        return bool(health) and health.get("Status") == "healthy"

    def terminate(self, timeout: float) -> int:
        """SIGTERM (the image's STOPSIGNAL), then the exit code it ends with."""
        _run([self.engine.cli, "kill", "--signal", "TERM", self.name], check=True)
        result = _run([self.engine.cli, "wait", self.name], timeout=timeout, check=True)
        return int(result.stdout.strip().splitlines()[-1])


def find_engine() -> Engine:
    """The engine ``make image`` builds with, once it is known to be able to build and run the
    image here; else :class:`Unavailable` with the reason."""
    docker = shutil.which("docker")
    docker_says = "docker is not installed"
    if docker:
        info = _run([docker, "info"], timeout=30)
        if info.returncode == 0:
            return _checked(Engine("docker"))
        docker_says = f"docker info: {_last_line(info)}"
    if not (shutil.which("buildah") and shutil.which("podman")):
        raise Unavailable(f"no docker daemon and no buildah/podman: {docker_says}")
    return _checked(Engine("podman"))


def _checked(engine: Engine) -> Engine:
    for image in base_images():
        if not engine.has_image(image):
            pulled = _run([engine.cli, "pull", image], timeout=300)
            if pulled.returncode != 0:
                raise Unavailable(f"no base image {image} and {engine.cli} cannot pull it: {_last_line(pulled)}")
        # A runtime that cannot start even the base image (missing kernel features, a rootless
        # setup without subuids, ...) is no place to try ours.
        probe = engine.run(image, "-c", "pass", entrypoint="python3", timeout=120)
        if probe.returncode != 0:
            raise Unavailable(f"{engine.cli} cannot run a container here: {_last_line(probe)}")
    return engine


def make_image(tag: str, *build_args: str) -> None:
    """``make image IMAGE=tag [BUILD_ARGS=...]``: the build a user runs."""
    result = _run(["make", "-C", str(ROOT), "image", f"IMAGE={tag}", f"BUILD_ARGS={shlex.join(build_args)}"],
                  timeout=900)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-40:])
        raise AssertionError(f"make image failed (exit {result.returncode}):\n{tail}")


def locked_versions(lock: Path) -> dict[str, str]:
    """name -> version from a pip-compile lock file (``name==version \\``), names normalized."""
    pins = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)", lock.read_text(), re.MULTILINE)
    return {normalize(name): version for name, version in pins}


def normalize(name: str) -> str:
    """PEP 503's normalized project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wait_until_healthy(container: Container, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not container.healthy():
        if time.monotonic() > deadline:
            raise AssertionError(f"HEALTHCHECK never passed in {timeout:.0f} s; logs:\n{container.logs()[-3000:]}")
        time.sleep(1)
