"""A minimal HTTP/1.1 keep-alive client connection, for the HTTP channel's POSTs.

Why not ``http.client``: measured here, it costs 130-170 us of CPU per POST to a local sink (a
regex check and an encode per ``putheader``, two ``sendall`` calls, ``email.parser`` for the
response headers), against ~25 us for this. Here a request is one bytes object sent with one
``sendall`` (the request line, ``Host`` and the connection's constant headers are encoded once),
and of the response only the status and its framing are parsed: ``Content-Length``,
``Transfer-Encoding: chunked`` (trailers included) or until-close, and ``Connection``. The body
is read and thrown away: the status is all a sender needs.

One request at a time (no pipelining). Errors:

- ``ValueError``: the request cannot be sent as given (CR, LF or NUL in a header, a bad header
  name, a non-latin-1 value); raised before anything is sent, the connection is untouched.
- ``TimeoutError``: no progress for ``timeout`` seconds (connect, send, or between reads).
- ``ProtocolError`` (an ``OSError``): the answer is not HTTP/1.x we can frame.
- other ``OSError`` (``ConnectionError``, ``ssl.SSLError``): the transport failed.

After any error but ``ValueError`` the connection is closed; the next ``post`` opens a new one.
A reused keep-alive connection that fails before any byte of the answer arrived (the server
closed it while idle: EOF, reset, broken pipe) is reopened and the request sent again, once.
"""

from __future__ import annotations

import re
import socket
import ssl
import threading
from collections.abc import Mapping, Sequence

__all__ = ["HttpConnection", "ProtocolError"]

MAX_HEAD = 65536  # bytes of one response's status line and headers (as http.client's line limit)
MAX_HEADERS = 100  # header (or trailer) lines of one response
MAX_INTERIM = 32  # 1xx responses before the final one
_RECV = 65536

# A header block is "name: value\r\n"*: names are RFC 9110 tokens; values have no CR, LF or NUL.
# One fullmatch over the whole block, plus one count of its LFs (a value "a\r\nX: b" would match
# as two headers), checks every header of a request: ~2 us for a CloudEvent's headers here; a loop
# of ``in`` checks over the values is ~1.4 us but leaves the names unchecked.
_HEADER_BLOCK = re.compile(r"(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+: [^\r\n\0]*\r\n)*")
_TARGET = re.compile(r"[\x21-\x7e]+")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
# The server closed an idle keep-alive connection: how that shows before any answer byte.
_STALE = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, ssl.SSLEOFError,
          ssl.SSLZeroReturnError)

Headers = Mapping[str, str] | Sequence[tuple[str, str]]

_default_context: ssl.SSLContext | None = None
_context_lock = threading.Lock()


def default_context() -> ssl.SSLContext:
    """One ``ssl.create_default_context()`` per process (loading the CA store costs milliseconds)."""
    global _default_context
    with _context_lock:
        if _default_context is None:
            _default_context = ssl.create_default_context()
        return _default_context


class ProtocolError(OSError):
    """The server's answer is not HTTP/1.x this client can read; the connection was closed."""


def encode_headers(headers: Headers) -> bytes:
    """``name: value\\r\\n`` per header, checked and latin-1 encoded; ValueError if invalid."""
    items = headers.items() if isinstance(headers, Mapping) else headers  # or pairs
    block = "".join([f"{name}: {value}\r\n" for name, value in items])
    if not _HEADER_BLOCK.fullmatch(block) or block.count("\n") != len(items):
        for name, value in items:  # which one (the error path only)
            line = f"{name}: {value}\r\n"
            if not _HEADER_BLOCK.fullmatch(line) or line.count("\n") != 1:
                raise ValueError(f"invalid HTTP header (CR, LF or NUL in the value, or a name that is "
                                 f"not a token): {name[:40]!r}: {value[:60]!r}")
        raise AssertionError("unreachable")
    try:
        return block.encode("latin-1")
    except UnicodeEncodeError as exc:  # a ValueError too
        raise ValueError(f"HTTP header value not latin-1: {block[max(0, exc.start - 40):exc.end + 20]!r}") from None


class HttpConnection:
    """One HTTP/1.1 keep-alive connection for POSTs, opened on the first ``post``. Not thread-safe.

    ``headers`` are sent with every request (encoded once); ``post`` adds ``Content-Length``
    itself, so neither may carry ``Content-Length``, ``Transfer-Encoding`` or ``Host``.
    """

    def __init__(self, host: str, port: int, *, tls: bool, timeout: float,
                 server_hostname: str | None = None, context: ssl.SSLContext | None = None,
                 headers: Headers = ()) -> None:
        self.host, self.port, self.tls, self.timeout = host, port, tls, timeout
        self._server_hostname = server_hostname or host
        self._context = context
        name = f"[{host}]" if ":" in host else host  # an IPv6 literal
        if port != (443 if tls else 80):
            name = f"{name}:{port}"
        self._constant = encode_headers({"Host": name, "Accept-Encoding": "identity"}) + encode_headers(headers)
        self._prefixes: dict[str, bytes] = {}
        self._sock: socket.socket | None = None

    def post(self, target: str, headers: Headers, body: bytes) -> int:
        """POST ``body`` to ``target`` (``/path?query``) and return the final status."""
        prefix = self._prefixes.get(target)
        if prefix is None:
            prefix = self._prefix(target)
        # One bytes object, one sendall: "%s" formatting is the cheapest way to build it here.
        request = b"%s%sContent-Length: %d\r\n\r\n%s" % (
            prefix, encode_headers(headers) if headers else b"", len(body), body)
        for attempt in (1, 2):
            reused = self._sock is not None
            sock = self._sock if self._sock is not None else self._connect()
            try:
                try:
                    sock.sendall(request)
                    first = sock.recv(_RECV)
                except _STALE:
                    first = b""
                    if not (reused and attempt == 1):
                        raise
                if not first:
                    if reused and attempt == 1:
                        self.close()  # the server closed the idle connection: once more, afresh
                        continue
                    raise ConnectionResetError("the server closed the connection without answering")
                status, keep = self._read_response(sock, first)
            except BaseException:
                self.close()
                raise
            if not keep:
                self.close()
            return status
        raise AssertionError("unreachable")

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __enter__(self) -> HttpConnection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------

    def _prefix(self, target: str) -> bytes:
        if not _TARGET.fullmatch(target):
            raise ValueError(f"invalid request target {target!r}")
        prefix = b"POST %s HTTP/1.1\r\n%s" % (target.encode("ascii"), self._constant)
        if len(self._prefixes) < 16:
            self._prefixes[target] = prefix
        return prefix

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls:
                context = self._context or default_context()
                sock = context.wrap_socket(sock, server_hostname=self._server_hostname)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        return sock

    def _read_response(self, sock: socket.socket, buf: bytes) -> tuple[int, bool]:
        """(status, keep-alive) of the final response; its body is read and dropped."""
        for _ in range(MAX_INTERIM + 1):
            head, buf = _read_head(sock, buf)
            lines = head.split(b"\n")
            version, _, rest = lines[0].partition(b" ")
            code = rest[:3]
            if not (version.startswith(b"HTTP/1.") and len(code) == 3 and code.isdigit()
                    and rest[3:4] in (b"", b" ", b"\r")):
                raise ProtocolError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
            status = int(code)
            if len(lines) > MAX_HEADERS + 1:
                raise ProtocolError(f"more than {MAX_HEADERS} header lines")
            if 100 <= status < 200:
                if status == 101:
                    raise ProtocolError("unexpected 101 Switching Protocols")
                continue  # 100 Continue, 103 Early Hints...: the final response follows
            if status < 100:
                raise ProtocolError(f"invalid status {status}")
            length: int | None = None
            chunked = until_close = close = keep_alive = False
            for line in lines[1:]:
                name, colon, value = line.partition(b":")
                if not colon:
                    continue  # obs-fold continuation or junk, of no header we use
                name = name.lower()
                if name == b"content-length":
                    value = value.strip()
                    if not value.isdigit() or len(value) > 18 or (length is not None and int(value) != length):
                        raise ProtocolError(f"invalid Content-Length {value[:40]!r}")
                    length = int(value)
                elif name == b"transfer-encoding":
                    # the last coding decides; anything but chunked is read until close (RFC 9112 6.3)
                    chunked = value.rsplit(b",", 1)[-1].strip().lower() == b"chunked"
                    until_close = not chunked
                elif name == b"connection":
                    tokens = [t.strip() for t in value.lower().split(b",")]
                    close = close or b"close" in tokens
                    keep_alive = keep_alive or b"keep-alive" in tokens
            keep = not close and (keep_alive or version != b"HTTP/1.0")
            if status in (204, 304):
                return status, keep and not buf
            if chunked:
                buf = _drain_chunked(sock, buf)
            elif length is not None and not until_close:
                if len(buf) >= length:
                    buf = buf[length:]
                else:
                    _drain(sock, length - len(buf))
                    buf = b""
            else:
                while sock.recv(_RECV):  # no length: the body ends when the server closes
                    pass
                return status, False
            # Bytes beyond the response mean the server and we disagree on framing: do not reuse.
            return status, keep and not buf
        raise ProtocolError(f"more than {MAX_INTERIM} interim (1xx) responses")


def _recv_more(sock: socket.socket, size: int = _RECV) -> bytes:
    data = sock.recv(size)
    if not data:
        raise ProtocolError("the server closed the connection in the middle of a response")
    return data


def _read_head(sock: socket.socket, buf: bytes) -> tuple[bytes, bytes]:
    """(status line and headers, what follows the blank line); CRLF or bare LF line ends."""
    while True:
        crlf = buf.find(b"\n\r\n")
        lf = buf.find(b"\n\n")
        end = crlf if crlf >= 0 and (lf < 0 or crlf < lf) else lf
        if end > MAX_HEAD or (end < 0 and len(buf) > MAX_HEAD):
            raise ProtocolError(f"response head longer than {MAX_HEAD} bytes")
        if end >= 0:
            return buf[:end], buf[end + (3 if end == crlf else 2):]
        buf += _recv_more(sock)


def _drain(sock: socket.socket, remaining: int) -> None:
    """Read and drop exactly ``remaining`` bytes (never more: they would be the next response)."""
    while remaining > 0:
        remaining -= len(_recv_more(sock, min(remaining, _RECV)))


def _read_line(sock: socket.socket, buf: bytes) -> tuple[bytes, bytes]:
    while (end := buf.find(b"\n")) < 0 and len(buf) <= MAX_HEAD:
        buf += _recv_more(sock)
    if not 0 <= end <= MAX_HEAD:
        raise ProtocolError("chunked body: line too long")
    return buf[:end].rstrip(b"\r"), buf[end + 1:]


def _drain_chunked(sock: socket.socket, buf: bytes) -> bytes:
    """Read and drop a chunked body and its trailers; returns the bytes after it."""
    while True:
        line, buf = _read_line(sock, buf)
        size_text = line.split(b";", 1)[0].strip()
        if not _CHUNK_SIZE.fullmatch(size_text):
            raise ProtocolError(f"invalid chunk size line {line[:40]!r}")
        size = int(size_text, 16)
        if size == 0:
            break
        size += 2  # the chunk's data and its CRLF
        if len(buf) >= size:
            buf = buf[size:]
        else:
            _drain(sock, size - len(buf))
            buf = b""
    for _ in range(MAX_HEADERS + 1):  # trailer fields, up to a blank line
        line, buf = _read_line(sock, buf)
        if not line:
            return buf
    raise ProtocolError(f"more than {MAX_HEADERS} trailer lines")
