"""One service for all pytest-xdist workers of a run, instead of one per worker.

The first worker that needs the service starts it (under a file lock) and writes its endpoint to
a state file; the others read the endpoint and register as users. The starter owns the process:
the kit starts services with a parent-death signal tied to the starting process, so the owner
stops it only after the other users have let it go (or died), and a worker that comes later
starts a new one. The owner waits for them at the end of its session (``at_exit``), not in the
fixture's teardown: that is part of its last test, which has a timeout. Without xdist
there is nothing to share: the service is the session's own.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from poller.kit.process import Service

log = logging.getLogger(__name__)

# How often the owner looks whether the other workers are done with its service.
_RELEASE_POLL_S = 0.5


@dataclass(frozen=True, slots=True)
class _State:
    endpoint: str
    owner: int
    users: tuple[int, ...]

    @classmethod
    def read(cls, path: Path) -> _State | None:
        if not path.exists():
            return None
        raw = json.loads(path.read_text())
        return cls(raw["endpoint"], raw["owner"], tuple(raw["users"]))

    def write(self, path: Path) -> None:
        path.write_text(json.dumps({"endpoint": self.endpoint, "owner": self.owner, "users": list(self.users)}))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def xdist_run_dir(basetemp: Path) -> Path | None:
    """The folder all workers of this xdist run share (their basetemps' parent), or None outside xdist."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return None
    return basetemp.parent


@contextmanager
def shared_service(
    name: str, run_dir: Path | None, start: Callable[[], Service], *, at_exit: Callable[[Callable[[], None]], None],
) -> Iterator[Service]:
    """``start()``'s service, or the one another worker of the run started already.

    A worker that did not start it gets a ``Service`` without a pid: it cannot stop it. The owner
    hands ``at_exit`` the wait for the other users and the stop.
    """
    if run_dir is None:
        with start() as service:
            yield service
        return
    me = os.getpid()
    state_path = run_dir / f"{name}.json"
    lock = FileLock(str(run_dir / f"{name}.lock"))
    owned: Service | None = None
    with lock:
        state = _State.read(state_path)
        if state is None or not _alive(state.owner):  # a crashed owner's service died with it
            owned = start()
            state = _State(owned.endpoint, me, (me,))
        else:
            state = _State(state.endpoint, state.owner, (*state.users, me))
            log.info("%s: using %s, started by pid %d", name, state.endpoint, state.owner)
        state.write(state_path)
    try:
        yield owned if owned is not None else Service(name, state.endpoint)
    finally:
        if owned is None:
            _leave(lock, state_path, me)
        else:
            service = owned

            def stop_when_unused() -> None:
                with service:
                    _release_when_unused(name, lock, state_path, me)

            at_exit(stop_when_unused)


def _leave(lock: FileLock, state_path: Path, me: int) -> None:
    with lock:
        state = _State.read(state_path)
        if state is not None:
            _State(state.endpoint, state.owner, tuple(u for u in state.users if u != me)).write(state_path)


def _release_when_unused(name: str, lock: FileLock, state_path: Path, me: int) -> None:
    """Wait until no other live worker uses the service, then remove the state file (under the
    lock, so that no worker joins a service about to stop)."""
    waited_from = time.monotonic()
    while True:
        with lock:
            state = _State.read(state_path)
            others = () if state is None else tuple(u for u in state.users if u != me and _alive(u))
            if not others:
                state_path.unlink(missing_ok=True)
                break
        time.sleep(_RELEASE_POLL_S)
    waited = time.monotonic() - waited_from
    if waited > 1:
        log.info("%s: stopping after %.0f s waiting for the other workers", name, waited)
