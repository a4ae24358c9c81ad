"""Logging setup shared by the supervisor and the workers, and a rate-limited log line."""

from __future__ import annotations

import logging
import sys
import threading
import time

import orjson

__all__ = ["LOG_FORMATS", "LOG_LEVELS", "JsonFormatter", "RateLimitedLog", "setup_logging"]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


LOG_FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers: time (UTC, RFC 3339), level, process, logger,
    message, and the exception's one-line description when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                    + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "process": record.processName,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and record.exc_info[1] is not None:
            doc["error"] = f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
        return orjson.dumps(doc).decode()


def setup_logging(level: str, log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s [%(processName)s] %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
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
