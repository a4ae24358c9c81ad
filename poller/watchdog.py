"""Liveness of a worker's loops: each loop beats, the main thread asks who is late.

The worker sends the supervisor a heartbeat only while every registered loop beat within its own
limit (gunicorn's worker ``notify()``, per loop): a receiver stuck in a call past every deadline,
or a deleter that died, stops the heartbeat, and the supervisor replaces the process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["Watchdog"]


class Watchdog:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._limits: dict[str, float] = {}

    def register(self, name: str, limit: float) -> Callable[[], None]:
        """Start watching loop ``name``; returns its ``beat()``. ``limit``: longest healthy gap."""
        last, clock = self._last, self._clock
        with self._lock:
            last[name] = clock()
            self._limits[name] = limit

        def beat() -> None:
            last[name] = clock()  # a dict store: atomic under the GIL, no lock on the hot path

        return beat

    def unregister(self, name: str) -> None:
        """The loop ended on purpose (shutdown): stop watching it."""
        with self._lock:
            self._last.pop(name, None)
            self._limits.pop(name, None)

    def late(self) -> list[str]:
        """One line per loop that has not beaten within its limit."""
        now = self._clock()
        with self._lock:
            beats = {name: (self._last.get(name, now), limit) for name, limit in self._limits.items()}
        return [
            f"{name} silent for {now - last:.0f}s (limit {limit:.0f}s)"
            for name, (last, limit) in beats.items()
            if now - last > limit
        ]
