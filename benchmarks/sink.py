"""A minimal, fast HTTP/1.1 sink for the benchmarks: answers 200 to every POST and counts.

Run in its own process (``python -m benchmarks.sink --port P``) so that its CPU is neither the
poller's nor the benchmark's. One thread, ``select.epoll``, non-blocking sockets; measured here
~75 us of CPU per request, two thirds of it in the kernel (loopback TCP), about what an asyncio
server costs too: a few thousand requests a second take a fifth of a core. Keep-alive and pipelining-safe; it parses only what it
needs to frame a request (``Content-Length``) and to count distinct CloudEvents ids (``ce-id``).

``GET /stats`` answers ``{"requests": n, "unique": u, "bytes": b}``; ``GET /reset`` zeroes them.
Not a general HTTP server: chunked bodies are not supported (the poller never sends them).
"""

from __future__ import annotations

import argparse
import logging
import select
import signal
import socket

import orjson

__all__ = ["SinkState", "handle_bytes", "main", "serve"]

log = logging.getLogger("benchmarks.sink")

_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
_BAD = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class SinkState:
    def __init__(self) -> None:
        self.requests = 0
        self.bytes = 0
        self.ids: set[bytes] = set()
        self.stopping = False

    def reset(self) -> None:
        self.requests = 0
        self.bytes = 0
        self.ids = set()

    def stats(self) -> bytes:
        return orjson.dumps({"requests": self.requests, "unique": len(self.ids), "bytes": self.bytes})


def _header(head: bytes, lowered: bytes, name: bytes) -> bytes | None:
    """The value of header ``name`` (lower-case, with the colon) in a request head, or None."""
    at = lowered.find(b"\r\n" + name)
    if at < 0:
        return None
    start = at + 2 + len(name)
    end = head.find(b"\r\n", start)
    return head[start:end if end >= 0 else len(head)].strip()


def _answer(state: SinkState, head: bytes, lowered: bytes, length: int) -> bytes:
    if lowered.startswith(b"get /stats"):
        body = state.stats()
        return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
            len(body), body)
    if lowered.startswith(b"get /reset"):
        state.reset()
        return _OK
    state.requests += 1
    state.bytes += length
    event_id = _header(head, lowered, b"ce-id:")
    if event_id is not None:
        state.ids.add(event_id)
    return _OK


def handle_bytes(state: SinkState, buffer: bytes) -> tuple[bytes, bytes, bool]:
    """Answer every complete request in ``buffer``: (answers, rest of the buffer, close?)."""
    out: list[bytes] = []
    while True:
        head_end = buffer.find(b"\r\n\r\n")
        if head_end < 0:
            return b"".join(out), buffer, False
        head = buffer[:head_end]
        lowered = head.lower()
        value = _header(head, lowered, b"content-length:")
        try:
            length = int(value) if value is not None else 0
        except ValueError:
            out.append(_BAD)
            return b"".join(out), b"", True
        end = head_end + 4 + length
        if len(buffer) < end:
            return b"".join(out), buffer, False
        out.append(_answer(state, head, lowered, length))
        buffer = buffer[end:]


def serve(host: str, port: int) -> SinkState:
    state = SinkState()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(1024)
    listener.setblocking(False)
    epoll = select.epoll()
    epoll.register(listener.fileno(), select.EPOLLIN)
    conns: dict[int, socket.socket] = {}
    buffers: dict[int, bytes] = {}

    def stop(signum: int, frame: object) -> None:
        state.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("sink listening on http://%s:%d/", host, port)
    lfd = listener.fileno()
    try:
        while not state.stopping:
            try:
                events = epoll.poll(0.5)
            except InterruptedError:
                continue
            for fd, _mask in events:
                if fd == lfd:
                    _accept(listener, epoll, conns, buffers)
                    continue
                conn = conns[fd]
                try:
                    data = conn.recv(262144)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    _drop(fd, epoll, conns, buffers)
                    continue
                buffered = buffers[fd]
                answers, buffers[fd], close = handle_bytes(state, buffered + data if buffered else data)
                if answers:
                    _send(conn, answers)
                if close:
                    _drop(fd, epoll, conns, buffers)
    finally:
        for fd in list(conns):
            _drop(fd, epoll, conns, buffers)
        epoll.close()
        listener.close()
    log.info("sink stopped after %d requests", state.requests)
    return state


def _send(conn: socket.socket, data: bytes) -> None:
    try:
        sent = conn.send(data)
    except BlockingIOError:
        sent = 0
    except OSError:
        return  # the peer went away; the next recv notices
    if sent < len(data):  # rare: answers are tiny; finish blocking rather than buffer
        conn.setblocking(True)
        try:
            conn.sendall(data[sent:])
        except OSError:
            pass
        conn.setblocking(False)


def _accept(listener: socket.socket, epoll: select.epoll, conns: dict[int, socket.socket],
            buffers: dict[int, bytes]) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return
        conn.setblocking(False)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conns[conn.fileno()] = conn
        buffers[conn.fileno()] = b""
        epoll.register(conn.fileno(), select.EPOLLIN)


def _drop(fd: int, epoll: select.epoll, conns: dict[int, socket.socket], buffers: dict[int, bytes]) -> None:
    conn = conns.pop(fd)
    buffers.pop(fd, None)
    try:
        epoll.unregister(fd)
    except OSError:
        pass
    conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s sink: %(message)s")
    serve(args.host, args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
