"""The benchmark's HTTP sink: one thread, ``select.epoll``, keep-alive, in its own process.

``python -m benchmarks.sink --port P [--delay-ms D | --stall]``

- default: answers ``200`` to every POST at once (a null subscriber; ~20,000 requests/s on one
  core here, far above what any contender sends, so it is never the bottleneck);
- ``--delay-ms 20``: answers each POST 20 ms after it arrived, without blocking anything else:
  answers wait in a FIFO (one delay for all, so the FIFO is in due order, and a connection's
  answers stay in its request order) and the poll timeout is the head's due time. Hundreds or
  thousands of requests can wait at once: a subscriber that needs 20 ms per event, with as much
  concurrency as the sender offers;
- ``--stall``: accepts connections, reads requests and never answers (a hung subscriber).

It counts requests and distinct event ids: the ``ce-id`` header (the poller and the boto3 loops
send the SQS message id there), else, for a sender without ids (mq-bridge posts the bare body),
the ``order`` in the body (see ``benchmarks.keys``). For stamped bodies it keeps the latency from
the send stamp to the first arrival of each id. Control requests, answered at once in every mode:
``GET /stats`` (``{"requests", "unique", "unkeyed", "bytes"}``), ``GET /latencies`` (the
latencies in microseconds, one per distinct message) and ``GET /reset``.
Not a general HTTP server: chunked request bodies are not supported (no contender sends them).
"""

from __future__ import annotations

import argparse
import collections
import logging
import select
import signal
import socket
import time

import orjson

from benchmarks.keys import order_of, sent_us_of

__all__ = ["SinkState", "main", "parse_requests", "serve"]

log = logging.getLogger("benchmarks.sink")

_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
_BAD = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class SinkState:
    def __init__(self) -> None:
        self.stopping = False
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.bytes = 0
        self.unkeyed = 0
        self.keys: set[bytes | int] = set()
        self.latencies_us: list[int] = []

    def record(self, event_id: bytes | None, body: bytes) -> None:
        self.requests += 1
        self.bytes += len(body)
        key: bytes | int | None = event_id if event_id else order_of(body)
        if key is None:
            self.unkeyed += 1
        elif key not in self.keys:
            self.keys.add(key)
            sent = sent_us_of(body)
            if sent:
                self.latencies_us.append(time.time_ns() // 1000 - sent)

    def stats(self) -> bytes:
        return orjson.dumps({"requests": self.requests, "unique": len(self.keys),
                             "unkeyed": self.unkeyed, "bytes": self.bytes})


def _json(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def _header(head: bytes, lowered: bytes, name: bytes) -> bytes | None:
    """The value of header ``name`` (lower-case, with the colon) in a request head, or None."""
    at = lowered.find(b"\r\n" + name)
    if at < 0:
        return None
    start = at + 2 + len(name)
    end = head.find(b"\r\n", start)
    return head[start:end if end >= 0 else len(head)].strip()


def _control(state: SinkState, lowered: bytes) -> bytes | None:
    """The answer to a control request (``GET /...``), or None for an event."""
    if not lowered.startswith(b"get /"):
        return None
    if lowered.startswith(b"get /stats"):
        return _json(state.stats())
    if lowered.startswith(b"get /latencies"):
        return _json(orjson.dumps(state.latencies_us))
    if lowered.startswith(b"get /reset"):
        state.reset()
    return _OK


def parse_requests(state: SinkState, buffer: bytes) -> tuple[list[bytes | None], bytes, bool]:
    """Take every complete request off ``buffer``.

    Returns (one entry per request: the control answer, or None for an event, which the caller
    answers as its mode says), the rest of the buffer, and whether to close the connection.
    """
    out: list[bytes | None] = []
    while True:
        head_end = buffer.find(b"\r\n\r\n")
        if head_end < 0:
            return out, buffer, False
        head = buffer[:head_end]
        lowered = head.lower()
        value = _header(head, lowered, b"content-length:")
        try:
            length = int(value) if value is not None else 0
        except ValueError:
            out.append(_BAD)
            return out, b"", True
        end = head_end + 4 + length
        if len(buffer) < end:
            return out, buffer, False
        answer = _control(state, lowered)
        if answer is None:
            state.record(_header(head, lowered, b"ce-id:"), buffer[head_end + 4:end])
        out.append(answer)
        buffer = buffer[end:]


class _Server:
    def __init__(self, host: str, port: int, *, delay: float, stall: bool) -> None:
        self.state = SinkState()
        self.delay = delay
        self.stall = stall
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, port))
        self.listener.listen(4096)
        self.listener.setblocking(False)
        self.epoll = select.epoll()
        self.epoll.register(self.listener.fileno(), select.EPOLLIN)
        self.conns: dict[int, socket.socket] = {}
        self.buffers: dict[int, bytes] = {}
        # (due, connection, answer): one delay for all, so appended in due order.
        self.delayed: collections.deque[tuple[float, socket.socket, bytes]] = collections.deque()

    def run(self) -> None:
        lfd = self.listener.fileno()
        while not self.state.stopping:
            timeout = 0.5
            if self.delayed:
                timeout = max(0.0, self.delayed[0][0] - time.monotonic())
            try:
                events = self.epoll.poll(timeout)
            except InterruptedError:
                continue
            for fd, _mask in events:
                if fd == lfd:
                    self._accept()
                else:
                    self._read(fd)
            if self.delayed:
                self._flush_due()
        for fd in list(self.conns):
            self._drop(fd)
        self.epoll.close()
        self.listener.close()

    def _read(self, fd: int) -> None:
        conn = self.conns.get(fd)
        if conn is None:
            return
        try:
            data = conn.recv(262144)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(fd)
            return
        buffered = self.buffers[fd]
        answers, self.buffers[fd], close = parse_requests(self.state, buffered + data if buffered else data)
        now = time.monotonic()
        immediate: list[bytes] = []
        for answer in answers:
            if answer is not None:
                immediate.append(answer)
            elif self.stall:
                continue
            elif self.delay > 0:
                self.delayed.append((now + self.delay, conn, _OK))
            else:
                immediate.append(_OK)
        if immediate:
            _send(conn, b"".join(immediate))
        if close:
            self._drop(fd)

    def _flush_due(self) -> None:
        now = time.monotonic()
        delayed = self.delayed
        while delayed and delayed[0][0] <= now:
            _due, conn, answer = delayed.popleft()
            if conn.fileno() >= 0:  # closed meanwhile: its answers go nowhere
                _send(conn, answer)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except BlockingIOError:
                return
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.conns[conn.fileno()] = conn
            self.buffers[conn.fileno()] = b""
            self.epoll.register(conn.fileno(), select.EPOLLIN)

    def _drop(self, fd: int) -> None:
        conn = self.conns.pop(fd)
        self.buffers.pop(fd, None)
        try:
            self.epoll.unregister(fd)
        except OSError:
            pass
        conn.close()


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


def serve(host: str, port: int, *, delay_ms: float = 0.0, stall: bool = False) -> SinkState:
    server = _Server(host, port, delay=delay_ms / 1000, stall=stall)

    def stop(signum: int, frame: object) -> None:
        server.state.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    mode = "stalled (never answers)" if stall else f"answers after {delay_ms:g} ms" if delay_ms else "answers at once"
    log.info("sink listening on http://%s:%d/, %s", host, port, mode)
    server.run()
    log.info("sink stopped after %d requests", server.state.requests)
    return server.state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--delay-ms", type=float, default=0.0, help="answer each event this late")
    mode.add_argument("--stall", action="store_true", help="never answer an event")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s sink: %(message)s")
    serve(args.host, args.port, delay_ms=args.delay_ms, stall=args.stall)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
