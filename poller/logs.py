"""Logging setup shared by the supervisor and the workers, a redacting filter, and a rate-limited
log line.

Two guards keep credentials out of the logs, also at ``--log-level DEBUG``:

- Third-party loggers (``THIRD_PARTY_LOGGERS``) stay at WARNING whatever the level: botocore's
  DEBUG lines carry whole requests and answers, with IRSA the web-identity JWT and STS's
  temporary secret key and session token. ``POLLER_DEBUG_LOGGERS=botocore,urllib3`` (logger
  names, comma-separated) turns the named ones to DEBUG, for when their lines are what you need.
- ``RedactingFilter`` on the one handler rewrites every line before it is written, whatever
  logger it came from: values of secret-looking keys, ``Authorization`` values, JWTs, PEM private
  keys, ``user:password@`` in URLs, and the values of the AWS secrets in the environment.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import orjson

__all__ = [
    "DEBUG_LOGGERS_ENV", "LOG_FORMATS", "LOG_LEVELS", "THIRD_PARTY_LOGGERS", "JsonFormatter", "RateLimitedLog",
    "RedactingFilter", "Redactor", "setup_logging",
]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


LOG_FORMATS = ("text", "json")

# Loggers of libraries, not of the poller: quiet (WARNING) unless named in DEBUG_LOGGERS_ENV.
# channels.kafka.librdkafka carries librdkafka's own lines (channels/kafka.py, _LibrdkafkaLog).
THIRD_PARTY_LOGGERS = ("botocore", "boto3", "urllib3", "s3transfer", "channels.kafka.librdkafka")
DEBUG_LOGGERS_ENV = "POLLER_DEBUG_LOGGERS"
_ALIASES = {"librdkafka": "channels.kafka.librdkafka"}

REDACTED = "***"
# Values shown as they are: LocalStack's documented dummy credentials (the demo's hint says
# AWS_SECRET_ACCESS_KEY=test), and what was redacted already.
_PLACEHOLDERS = frozenset({"test", REDACTED})
# Environment variables whose values are redacted wherever they appear; shorter values are not
# (a test's "test" would blank every queue name). AWS secret keys are 40 characters.
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
_MIN_LITERAL = 12

# A key whose value is a secret: names containing one of these words, in any case and style
# (AWS_SESSION_TOKEN, SessionToken, X-Amz-Security-Token, WebIdentityToken, sasl.password, ...).
_KEY = r"[A-Za-z0-9_.\-]*(?:password|passwd|secret|token|authorization|signature|api[_-]?key)[A-Za-z0-9_.\-]*"
_FLAGS = re.IGNORECASE | re.DOTALL
_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    # PEM private keys (ssl.key.pem, a pasted key).
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.DOTALL), REDACTED),
    # Quoted key, quoted value: Python reprs ({'X-Amz-Security-Token': b'...'}), JSON
    # ("SecretAccessKey": "..."), JSON inside a JSON string (\"SessionToken\": \"...\").
    (re.compile(rf"""(?P<q>["'])(?P<key>{_KEY})(?P=q)(?P<sep>\s*[:=]\s*b?)(?P<vq>["'])(?P<val>(?:\\.|(?!(?P=vq))[^\\])*)(?P=vq)""",
                _FLAGS), rf"\g<q>\g<key>\g<q>\g<sep>\g<vq>{REDACTED}\g<vq>"),
    (re.compile(rf"""(?P<q>\\["'])(?P<key>{_KEY})(?P=q)(?P<sep>\s*:\s*)(?P<vq>\\["'])(?P<val>.*?)(?P=vq)""", _FLAGS),
     rf"\g<q>\g<key>\g<q>\g<sep>\g<vq>{REDACTED}\g<vq>"),
    # XML elements: STS answers (<SecretAccessKey>...</SecretAccessKey>, <SessionToken>).
    (re.compile(rf"(?P<open><(?P<key>{_KEY})(?:\s[^>]*)?>)(?P<val>[^<]*)(?P<close></(?P=key)\s*>)", _FLAGS),
     rf"\g<open>{REDACTED}\g<close>"),
    # Authorization headers: the value runs to the end of the line (SigV4's has spaces and commas).
    (re.compile(r"(?P<key>(?<![A-Za-z0-9_.\-])(?:proxy-)?authorization)(?P<sep>\s*[:=]\s*)[^\r\n'\"]*", _FLAGS),
     rf"\g<key>\g<sep>{REDACTED}"),
    # key=value and key: value (environment, form bodies, query strings, header lines, reprs
    # such as secret_key='...'): a quoted value, or up to the next separator.
    (re.compile(rf"""(?P<key>(?<![A-Za-z0-9_.\-]){_KEY})(?P<sep>\s*[=:]\s*)(?P<val>b?"[^"]*"|b?'[^']*'|[^\s&'",;)}}\]]+)""",
                _FLAGS), rf"\g<key>\g<sep>{REDACTED}"),
    # JWTs anywhere (RFC 7519: base64url segments; the JOSE header is JSON, so "eyJ"): the
    # service account's web-identity token.
    (re.compile(r"\beyJ[A-Za-z0-9_\-]{4,}(?:\.[A-Za-z0-9_\-]*){2,4}"), REDACTED),
    # HTTP credentials by scheme (RFC 9110 11.6.2), without a header name in front.
    (re.compile(r"\b(?P<scheme>Basic|Bearer)\s+(?=[A-Za-z0-9+/=._~\-]*[A-Z0-9+/=])[A-Za-z0-9+/=._~\-]{8,}"),
     rf"\g<scheme> {REDACTED}"),
    # user:password@ in any URL (RFC 3986 3.2.1).
    (re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)[^/\s@'\"]+@"), rf"\g<scheme>{REDACTED}@"),
)
# A cheap first look: most lines have none of these and skip the rules.
_SUSPECT = re.compile(r"password|passwd|secret|token|authoriz|signature|api.?key|private key|eyJ|Basic |Bearer |://",
                      re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Redactor:
    """``redactor(text)``: the text with credentials replaced by ``***``; ``literals`` are
    secret values replaced wherever they appear."""

    literals: tuple[str, ...] = ()

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Redactor:
        env = os.environ if environ is None else environ
        values = {env.get(name, "") for name in _SECRET_ENV}
        return cls(tuple(sorted(v for v in values if len(v) >= _MIN_LITERAL)))

    def __call__(self, text: str) -> str:
        for literal in self.literals:
            if literal in text:
                text = text.replace(literal, REDACTED)
        if not _SUSPECT.search(text):
            return text
        for pattern, template in _RULES:
            text = pattern.sub(functools.partial(_replace, template=template), text)
        return text


def _replace(match: re.Match[str], *, template: str) -> str:
    value = match.groupdict().get("val")
    if value is not None and value.removeprefix("b").strip("'\"") in _PLACEHOLDERS:
        return match.group(0)
    return match.expand(template)


class RedactingFilter(logging.Filter):
    """On the handler: every record's message, exception text and stack go through ``redact``
    before any formatter sees them (the record is rewritten: ``args`` are merged in)."""

    def __init__(self, redact: Callable[[str], str]) -> None:
        super().__init__()
        self._redact = redact

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - bad arguments: log what can be shown, not logging's own traceback
            message = f"{record.msg} (unformattable log arguments)"
        record.msg, record.args = self._redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self._redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self._redact(record.stack_info)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers: time (UTC, RFC 3339), level, process, logger,
    message, and the exception's one-line description when there is one."""

    def __init__(self, redact: Callable[[str], str] = lambda text: text) -> None:
        super().__init__()
        self._redact = redact

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
            doc["error"] = self._redact(f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}")
        return orjson.dumps(doc).decode()


def debug_loggers(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The logger names in ``POLLER_DEBUG_LOGGERS`` (comma-separated; ``librdkafka`` is short
    for ``channels.kafka.librdkafka``)."""
    value = (os.environ if environ is None else environ).get(DEBUG_LOGGERS_ENV, "")
    names = (name.strip() for name in value.split(","))
    return tuple(_ALIASES.get(name, name) for name in names if name)


def setup_logging(level: str, log_format: str = "text") -> None:
    """Root logging to stderr at ``level``, through a ``RedactingFilter``; third-party loggers
    at WARNING, those named in ``POLLER_DEBUG_LOGGERS`` at DEBUG (whatever ``level`` is)."""
    redact = Redactor.from_environment()
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactingFilter(redact))
    if log_format == "json":
        handler.setFormatter(JsonFormatter(redact))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s [%(processName)s] %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in debug_loggers():
        logging.getLogger(name).setLevel(logging.DEBUG)


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
