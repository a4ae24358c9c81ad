"""What the HTTP channel sends a sink to be let in: a bearer token read from a file that rotates
(``--sink-token-file``), and headers of the user's (``--sink-header``, for API keys).

A token file is what Kubernetes projects into a pod: a Knative SinkBinding's OIDC token
(``/oidc/token``, from a Secret the binding renews) or a ``serviceAccountToken`` projection with
the sink's audience. The kubelet rotates both by writing a new directory and swapping the
``..data`` symlink, so the path's target (device, inode, mtime, size: ``os.stat`` follows the
links) tells a new token from the old one. ``TokenFile.check`` does one ``stat`` and reads the
file only when that changed; the channel calls it at most once a second (and sooner after a 401),
never per request. Tokens are never logged, nor are header values.

``--sink-header 'Name: value'``: a value may take environment variables as ``${NAME}`` (``$${``
is a literal ``${``), so a secret can come from a Kubernetes ``secretKeyRef`` without being
written into the manifest's args; ``POLLER_SINK_HEADER`` holds one header per line.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping

__all__ = ["RESERVED_HEADERS", "TokenFile", "check_headers", "parse_headers", "read_token"]

log = logging.getLogger(__name__)

# Headers the channel sets itself or that frame the request: a user's header may not replace them
# (the CloudEvents attributes are ce-* headers in binary mode; Content-Type is datacontenttype).
RESERVED_HEADERS = frozenset({
    "host", "content-type", "content-length", "transfer-encoding", "connection", "keep-alive", "te",
    "trailer", "upgrade", "expect", "accept-encoding", "proxy-connection",
})
_TOKEN_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token
_ENV_REFERENCE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
MAX_TOKEN = 64 * 1024  # bytes; service account JWTs are 1-2 KiB


def read_token(path: str) -> str:
    """The token in ``path`` (surrounding whitespace dropped); a one-line ValueError if the file
    cannot be read, is empty, or is not one line of printable ASCII (the error never shows it)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_TOKEN + 1)
    except FileNotFoundError:
        raise ValueError(f"--sink-token-file {path}: no such file") from None
    except OSError as exc:
        raise ValueError(f"--sink-token-file {path}: cannot read it: {exc.strerror or type(exc).__name__}") from None
    if len(raw) > MAX_TOKEN:
        raise ValueError(f"--sink-token-file {path}: longer than {MAX_TOKEN} bytes, not a token")
    token = raw.strip()
    if not token:
        raise ValueError(f"--sink-token-file {path}: the file is empty")
    if not all(0x21 <= byte <= 0x7E for byte in token):
        raise ValueError(f"--sink-token-file {path}: the token must be one word of printable ASCII "
                         "(no spaces, line breaks or other characters)")
    return token.decode("ascii")


class TokenFile:
    """A token file's current token, read again when the file changes (``check``)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._seen = self._identity()
        self.token = read_token(path)  # a ValueError at start: nothing to send without it
        self._failing = False  # a failed re-read was logged; logged again only after a success

    def _identity(self) -> tuple[int, int, int, int] | None:
        try:
            st = os.stat(self.path)  # follows the symlinks to the current target
        except OSError:
            return None
        return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size

    def check(self) -> str | None:
        """The new token if the file changed and holds one, else None (the last token stays)."""
        seen = self._identity()
        if seen == self._seen:
            return None
        try:
            token = read_token(self.path)
        except ValueError as exc:  # mid-swap, or removed: keep the last token, try again later
            if not self._failing:
                log.warning("%s; the last token read is still sent", exc)
                self._failing = True
            return None
        self._seen, self._failing = seen, False
        if token == self.token:
            return None
        self.token = token
        log.info("--sink-token-file %s changed: the new token is sent from now on", self.path)
        return token


def parse_headers(items: Iterable[str], environ: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """``Name: value`` items as (name, value) pairs, ``${VAR}`` expanded from ``environ``; blank
    items are skipped (an environment variable's empty lines). A one-line ValueError names the
    header, never its value."""
    headers: list[tuple[str, str]] = []
    for item in items:
        if not item.strip():
            continue
        name, colon, value = item.partition(":")
        name = name.strip()
        if not colon or not name:
            # without the colon there is no telling the name from the value: show neither
            raise ValueError("--sink-header: expected 'Name: value' (the text given is not shown)")
        headers.append((name, _expand(name, value.strip(), environ)))
    check_headers(headers)
    return tuple(headers)


def check_headers(headers: Iterable[tuple[str, str]]) -> None:
    """A one-line ValueError for a header name that is not a token, one the channel sets itself
    (``RESERVED_HEADERS``, ``ce-*``), one given twice, or a value with a control character."""
    seen: set[str] = set()
    for name, value in headers:
        lower = name.lower()
        if not _TOKEN_NAME.fullmatch(name):
            raise ValueError(f"--sink-header {name[:40]!r}: not a valid header name")
        if lower.startswith("ce-") or lower in RESERVED_HEADERS:
            raise ValueError(f"--sink-header {name}: the channel sets this header itself (CloudEvents "
                             "attributes are ce-* headers; Host, Content-Type, Content-Length and the "
                             "connection's headers are the transport's)")
        if lower in seen:
            raise ValueError(f"--sink-header {name}: given twice")
        seen.add(lower)
        if any((ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F or ord(c) > 0xFF for c in value):
            raise ValueError(f"--sink-header {name}: the value has a line break, a control character "
                             "or a character outside Latin-1 (not shown)")


def _expand(name: str, value: str, environ: Mapping[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        variable = match.group(1)
        if variable is None:  # $${: a literal ${
            return "${"
        if variable not in environ:
            raise ValueError(f"--sink-header {name}: the environment variable {variable} is not set")
        return environ[variable]

    return _ENV_REFERENCE.sub(replace, value)
