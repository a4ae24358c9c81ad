"""Logging setup shared by the supervisor and the workers, and a rate-limited log line."""

from __future__ import annotations

import logging
import sys
import threading
import time

__all__ = ["LOG_LEVELS", "RateLimitedLog", "setup_logging"]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)-7s [%(processName)s] %(message)s",
        force=True,
    )
    # botocore logs every credential lookup at INFO; keep it quiet unless debugging.
    logging.getLogger("botocore").setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)


class RateLimitedLog:
    """Logs at most one WARNING per ``every`` seconds, with how often it happened meanwhile.

    For events that can come by the thousand (a dead sink nacks every message): one line with
    a count says as much as a flood.
    """

    def __init__(self, logger: logging.Logger, template: str, every: float = 5.0) -> None:
        self._logger = logger
        self._template = template
        self._every = every
        self._lock = threading.Lock()
        self._count = 0
        self._next = 0.0

    def hit(self, detail: str) -> None:
        with self._lock:
            self._count += 1
            now = time.monotonic()
            if now < self._next:
                return
            count, self._count = self._count, 0
            self._next = now + self._every
        self._logger.warning(self._template, count, detail)
