"""A minimal HTTP/1.1 keep-alive client connection, for the HTTP channel's and SQS's POSTs.

Why not ``http.client``: measured here, it costs 130-170 us of CPU per POST to a local sink (a
regex check and an encode per ``putheader``, two ``sendall`` calls, ``email.parser`` for the
response headers), against ~25 us for this. Here a request is one bytes object sent with one
``sendall`` (the request line, ``Host`` and the connection's constant headers are encoded once),
and of the response only the status and its framing are parsed: ``Content-Length``,
``Transfer-Encoding: chunked`` (trailers included) or until-close, and ``Connection``. ``post``
reads the body and throws it away (the status is all a sender needs); ``request`` returns it
(SQS's JSON answers). Both take a per-call ``timeout`` (an SQS long poll waits longer): one
deadline for the whole call, connect, send and the full answer, so a server that trickles its
answer cannot hold the caller longer than that. Each blocking socket operation gets only the time
left (within ``_SLACK``: the socket's timeout is re-set, a syscall, only when it is off by more).

One request at a time (no pipelining). Errors:

- ``ValueError``: the request cannot be sent as given (CR, LF or NUL in a header, a bad header
  name, a non-latin-1 value); raised before anything is sent, the connection is untouched.
- ``TimeoutError``: the call (connect, send, the whole answer) took more than ``timeout`` seconds.
- ``ProtocolError`` (an ``OSError``): the answer is not HTTP/1.x we can frame (this includes
  both ``Content-Length`` and ``Transfer-Encoding``, RFC 9112 6.3: a sign of response smuggling).
- ``Aborted`` (an ``OSError``): ``abort()`` was called, from any thread; it breaks off a call
  in progress (a blocked ``recv`` returns) and every later call raises it at once.
- other ``OSError`` (``ConnectionError``, ``ssl.SSLError``): the transport failed.

After any error but ``ValueError`` the connection is closed; the next call opens a new one.
A kept-alive connection is reused only if it is idle and clean: nothing readable on it (checked
with a zero-timeout poll, as httpcore does). A readable idle socket is the server's close, or
bytes it sent unasked (a stray response must never be read as the next request's answer): it is
closed and a new one opened; on TLS, unless all it holds is TLS records (session tickets), which
a read that does not block consumes. A reused connection that still fails before any byte of the
answer arrived (the server closed it just after that check: EOF, reset, broken pipe) is reopened
and the request sent again, once, within the same deadline: only for requests that are safe to
repeat (the channel's POSTs and these SQS calls are).
"""

from __future__ import annotations

import functools
import re
import select
import socket
import ssl
from collections.abc import Callable, Mapping, Sequence
from time import monotonic

__all__ = ["Aborted", "HttpConnection", "ProtocolError"]

MAX_HEAD = 65536  # bytes of one response's status line and headers (as http.client's line limit)
MAX_HEADERS = 100  # header (or trailer) lines of one response
MAX_INTERIM = 32  # 1xx responses before the final one
_RECV = 65536
# How far a blocking operation's socket timeout may be from the time left to the call's deadline
# before it is re-set: settimeout is a syscall, and the common POST needs none.
_SLACK = 0.005

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

@functools.cache
def default_context() -> ssl.SSLContext:
    """One ``ssl.create_default_context()`` per process (loading the CA store costs milliseconds)."""
    return ssl.create_default_context()


class ProtocolError(OSError):
    """The server's answer is not HTTP/1.x this client can read; the connection was closed."""


class Aborted(OSError):
    """``HttpConnection.abort()`` was called: the call was broken off, or refused."""


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
    """One HTTP/1.1 keep-alive connection for POSTs, opened on the first call. Not thread-safe,
    except ``abort()``, which is meant to be called from another thread.

    ``headers`` are sent with every request (encoded once); ``Host`` (``authority``) and
    ``Content-Length`` are added here, so neither argument may carry ``Content-Length``,
    ``Transfer-Encoding`` or ``Host``. ``timeout``: the default of every call; a connect (and TLS
    handshake) is bounded by it too, besides the call's own deadline.
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
        self.authority = name  # the Host header's value (SigV4 signs it)
        self._constant = encode_headers({"Host": name, "Accept-Encoding": "identity"}) + encode_headers(headers)
        self._prefixes: dict[str, bytes] = {}
        self._sock: socket.socket | None = None
        self._sock_timeout = float(timeout)  # what the open socket is set to: settimeout is a syscall
        self._readable: Callable[[], object] = _never  # anything to read on the idle socket?
        self._deadline = 0.0  # of the call in progress (time.monotonic())
        self._aborted = False

    def post(self, target: str, headers: Headers, body: bytes, *, timeout: float | None = None) -> int:
        """POST ``body`` to ``target`` (``/path?query``) and return the final status; the answer's
        body is read and dropped."""
        return self._exchange(target, headers, body, timeout, None)[0]

    def request(self, target: str, headers: Headers, body: bytes, *,
                timeout: float | None = None) -> tuple[int, bytes]:
        """POST ``body`` to ``target`` and return the final status and the answer's body."""
        parts: list[bytes] = []
        status = self._exchange(target, headers, body, timeout, parts)[0]
        return status, b"".join(parts)

    def abort(self) -> None:
        """Break off a call in progress (from any thread) and refuse every later one (``Aborted``).

        Shuts the socket down, so a blocked ``recv``/``sendall`` returns at once; the calling thread
        closes it. A connect in progress is not interrupted: it is refused once it completes.
        """
        self._aborted = True  # set before reading _sock; _connect stores the socket, then checks it
        sock = self._sock
        if sock is not None:
            try:
                # socket.socket's own shutdown, not SSLSocket's: that one also drops the TLS
                # object, under the feet of the thread reading from it.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass  # already closed, or not connected yet

    def _exchange(self, target: str, headers: Headers, body: bytes, timeout: float | None,
                  parts: list[bytes] | None) -> tuple[int, bool]:
        """Send one request and read its answer, the body into ``parts`` (dropped if None)."""
        if self._aborted:
            raise Aborted("the connection was aborted")
        prefix = self._prefixes.get(target)
        if prefix is None:
            prefix = self._prefix(target)
        # One bytes object, one sendall: "%s" formatting is the cheapest way to build it here.
        request = b"%s%sContent-Length: %d\r\n\r\n%s" % (
            prefix, encode_headers(headers) if headers else b"", len(body), body)
        self._deadline = monotonic() + (self.timeout if timeout is None else timeout)
        for attempt in (1, 2):
            # A readable idle connection was closed by the server, or holds bytes nobody asked
            # for: taking those for this request's answer could turn a 500 into a 200.
            if self._sock is not None and self._readable() and not self._only_tls_records(self._sock):
                self.close()
            reused = self._sock is not None
            try:
                sock = self._sock if self._sock is not None else self._connect()
                if self._aborted:  # abort() came while connecting, or broke off the first try
                    raise Aborted("the connection was aborted")
                self._arm(sock, self._deadline)
                try:
                    sock.sendall(request)
                    self._arm(sock, self._deadline)
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
                status, keep = self._read_response(sock, first, parts)
            except Aborted:
                self.close()
                raise
            except BaseException as exc:
                self.close()
                if self._aborted and isinstance(exc, Exception):  # EOF, reset... caused by abort()
                    raise Aborted(f"the connection was aborted ({exc!r})") from exc
                raise
            if not keep:
                self.close()
            return status, keep
        raise AssertionError("unreachable")

    def close(self) -> None:
        sock, self._sock = self._sock, None
        self._readable = _never
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
        # A connect need not wait as long as a long poll's answer: the connection's timeout
        # bounds it too.
        deadline = min(self._deadline, monotonic() + self.timeout)
        sock = _open_socket(self.host, self.port, deadline)
        # Stored at once: abort() can reach it.
        self._sock, self._sock_timeout = sock, sock.gettimeout() or 0.0
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls:
                context = self._context or default_context()
                # The handshake after storing the TLS socket, so that abort() can break it off too.
                sock = context.wrap_socket(sock, server_hostname=self._server_hostname,
                                           do_handshake_on_connect=False)
                self._sock = sock
                if self._aborted:
                    raise Aborted("the connection was aborted")
                self._arm(sock, deadline)
                sock.do_handshake()  # bounded as a whole by the timeout (ssl keeps a deadline)
            self._readable = _readable_check(sock)
        except BaseException:
            self.close()
            raise
        return sock

    def _arm(self, sock: socket.socket, deadline: float) -> None:
        """Give the next blocking operation on ``sock`` only the time left before ``deadline``.

        A socket timeout bounds one operation, and restarts with each: without this, a server
        sending a byte now and then would hold the call forever.
        """
        remaining = deadline - monotonic()
        if remaining <= 0:
            raise TimeoutError("timed out")
        if not -_SLACK <= self._sock_timeout - remaining <= _SLACK:
            sock.settimeout(remaining)
            self._sock_timeout = remaining

    def _only_tls_records(self, sock: socket.socket) -> bool:
        """Whether a readable idle socket carries only TLS records that some servers send after
        an answer (TLS 1.3 session tickets, key updates), which leave it reusable: a read that
        does not block tells. Anything else (data, EOF, an error, plain TCP) does not."""
        if not isinstance(sock, ssl.SSLSocket):
            return False
        sock.settimeout(0.0)
        self._sock_timeout = 0.0  # the next _arm sets it back
        try:
            sock.recv(1)  # application data (unasked) or b"" (closed): not reusable
        except ssl.SSLWantReadError:
            return True  # only TLS records: consumed, nothing for us
        except OSError:
            pass
        return False

    def _recv(self, sock: socket.socket, size: int = _RECV) -> bytes:
        self._arm(sock, self._deadline)
        return sock.recv(size)

    def _recv_more(self, sock: socket.socket, size: int = _RECV) -> bytes:
        data = self._recv(sock, size)
        if not data:
            raise ProtocolError("the server closed the connection in the middle of a response")
        return data

    def _read_response(self, sock: socket.socket, buf: bytes, parts: list[bytes] | None) -> tuple[int, bool]:
        """(status, keep-alive) of the final response; its body is read into ``parts``, or
        dropped if None."""
        for _ in range(MAX_INTERIM + 1):
            head, buf = self._read_head(sock, buf)
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
            length, chunked, until_close, keep = _framing(version, lines)
            if status in (204, 304):
                return status, keep and not buf
            if chunked:
                buf = self._read_chunked(sock, buf, parts)
            elif not until_close:  # a Content-Length (_framing makes it 0 if there is none)
                if len(buf) >= length:
                    if parts is not None:
                        parts.append(buf[:length])
                    buf = buf[length:]
                else:
                    if parts is not None:
                        parts.append(buf)
                    self._read_exact(sock, length - len(buf), parts)
                    buf = b""
            else:
                if parts is not None:  # no length: the body ends when the server closes
                    parts.append(buf)
                while data := self._recv(sock):
                    if parts is not None:
                        parts.append(data)
                return status, False
            # Bytes beyond the response mean the server and we disagree on framing: do not reuse.
            return status, keep and not buf
        raise ProtocolError(f"more than {MAX_INTERIM} interim (1xx) responses")

    def _read_head(self, sock: socket.socket, buf: bytes) -> tuple[bytes, bytes]:
        """(status line and headers, what follows the blank line); CRLF or bare LF line ends."""
        while True:
            crlf = buf.find(b"\n\r\n")
            lf = buf.find(b"\n\n")
            end = crlf if crlf >= 0 and (lf < 0 or crlf < lf) else lf
            if end > MAX_HEAD or (end < 0 and len(buf) > MAX_HEAD):
                raise ProtocolError(f"response head longer than {MAX_HEAD} bytes")
            if end >= 0:
                return buf[:end], buf[end + (3 if end == crlf else 2):]
            buf += self._recv_more(sock)

    def _read_exact(self, sock: socket.socket, remaining: int, parts: list[bytes] | None) -> None:
        """Read exactly ``remaining`` bytes (never more: they would be the next response), into
        ``parts``, or dropped if None."""
        while remaining > 0:
            data = self._recv_more(sock, min(remaining, _RECV))
            remaining -= len(data)
            if parts is not None:
                parts.append(data)

    def _read_line(self, sock: socket.socket, buf: bytes) -> tuple[bytes, bytes]:
        while (end := buf.find(b"\n")) < 0 and len(buf) <= MAX_HEAD:
            buf += self._recv_more(sock)
        if not 0 <= end <= MAX_HEAD:
            raise ProtocolError("chunked body: line too long")
        return buf[:end].rstrip(b"\r"), buf[end + 1:]

    def _read_chunked(self, sock: socket.socket, buf: bytes, parts: list[bytes] | None) -> bytes:
        """Read a chunked body (into ``parts``, or dropped if None) and its trailers; returns the
        bytes after it."""
        while True:
            line, buf = self._read_line(sock, buf)
            size_text = line.split(b";", 1)[0].strip()
            if not _CHUNK_SIZE.fullmatch(size_text):
                raise ProtocolError(f"invalid chunk size line {line[:40]!r}")
            size = int(size_text, 16)
            if size == 0:
                break
            if len(buf) >= size:
                if parts is not None:
                    parts.append(buf[:size])
                buf = buf[size:]
            else:
                if parts is not None:
                    parts.append(buf)
                self._read_exact(sock, size - len(buf), parts)
                buf = b""
            line, buf = self._read_line(sock, buf)  # the CRLF that ends the chunk's data
            if line:
                raise ProtocolError(f"chunk data longer than its size line said: {line[:40]!r}")
        for _ in range(MAX_HEADERS + 1):  # trailer fields, up to a blank line
            line, buf = self._read_line(sock, buf)
            if not line:
                return buf
        raise ProtocolError(f"more than {MAX_HEADERS} trailer lines")


def _framing(version: bytes, lines: list[bytes]) -> tuple[int, bool, bool, bool]:
    """(Content-Length or 0, chunked, until close, keep-alive) from a final response's headers."""
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
    if length is not None and (chunked or until_close):
        # RFC 9112 6.3: both framings at once is a smuggling attempt or a broken server.
        raise ProtocolError("response has both Content-Length and Transfer-Encoding")
    if length is None and not chunked:
        until_close = True  # no framing at all: the body ends when the server closes
    return length or 0, chunked, until_close, not close and (keep_alive or version != b"HTTP/1.0")


def _open_socket(host: str, port: int, deadline: float) -> socket.socket:
    """``socket.create_connection``, but every address tried shares one deadline (it gives each
    the whole timeout). Name resolution itself is not bounded (getaddrinfo has no timeout)."""
    error: OSError | None = None
    for family, kind, proto, _, address in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
        remaining = deadline - monotonic()
        if remaining <= 0:
            break
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(remaining)
            sock.connect(address)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    raise error if error is not None else TimeoutError("timed out")


def _never() -> bool:
    return False


def _readable_check(sock: socket.socket) -> Callable[[], object]:
    """A zero-timeout test that ``sock`` has something to read (data, EOF, an error): one poll
    syscall, its poll object made once per connection. For TLS, decrypted bytes not yet read
    count too (``pending()``: no syscall)."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)  # POLLHUP, POLLERR, POLLNVAL come anyway
        poll = functools.partial(poller.poll, 0)
    else:
        fd = sock.fileno()
        poll = lambda: select.select([fd], [], [], 0)[0]
    if isinstance(sock, ssl.SSLSocket):
        pending = sock.pending
        return lambda: pending() or poll()
    return poll
