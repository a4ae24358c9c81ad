"""A TCP proxy that puts a service ``--rtt-ms`` away: half of it each way, in its own process.

``python -m benchmarks.proxy --port P --upstream 127.0.0.1:4566 --rtt-ms 20``

Every chunk read from one side is written to the other ``rtt/2`` later, so each request/answer
round trip (an SQS call on a keep-alive connection) gains ``rtt``, while the pipe keeps its
bandwidth: chunks in flight overlap, as on a long link, instead of queueing behind each other.
Per direction one FIFO and one timer keep the bytes in order. There is no ``tc netem`` here
(no root network namespace to shape), hence this. asyncio on uvloop when it is installed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import signal

__all__ = ["DelayedPipe", "main", "serve"]

log = logging.getLogger("benchmarks.proxy")


class DelayedPipe(asyncio.Protocol):
    """One side of a proxied connection: what it reads goes to ``peer`` ``delay`` seconds later."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer: DelayedPipe | None = None
        self.pending: collections.deque[tuple[float, bytes | None]] = collections.deque()  # None: EOF
        self.timer: asyncio.TimerHandle | None = None
        self.early: list[bytes | None] = []  # read before the peer was connected
        self.ended = False  # our EOF was queued for the peer
        self.ended_through = False  # ... and delivered to it

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._forward(data)

    def eof_received(self) -> bool:
        self._forward(None)
        return True  # keep our write side open until the peer's EOF has come through

    def connection_lost(self, exc: Exception | None) -> None:
        self._forward(None)

    def link(self, peer: DelayedPipe) -> None:
        self.peer = peer
        for item in self.early:
            self._forward(item)
        self.early.clear()

    def _forward(self, data: bytes | None) -> None:
        if data is None:
            if self.ended:
                return
            self.ended = True
        if self.peer is None:
            self.early.append(data)
            return
        self.pending.append((self.loop.time() + self.delay, data))
        if self.timer is None:
            self.timer = self.loop.call_at(self.pending[0][0], self._flush)

    def _flush(self) -> None:
        self.timer = None
        now = self.loop.time()
        peer = self.peer
        assert peer is not None
        while self.pending and self.pending[0][0] <= now:
            _due, data = self.pending.popleft()
            target = peer.transport
            if target is None or target.is_closing():
                self.pending.clear()
                if self.transport is not None:
                    self.transport.close()
                return
            if data is None:
                self.ended_through = True
                if peer.ended_through or not target.can_write_eof():
                    target.close()  # both directions are done
                    if self.transport is not None:
                        self.transport.close()
                else:
                    target.write_eof()
            else:
                target.write(data)
        if self.pending:
            self.timer = self.loop.call_at(self.pending[0][0], self._flush)


async def serve(port: int, upstream_host: str, upstream_port: int, rtt_ms: float, host: str = "127.0.0.1") -> None:
    loop = asyncio.get_running_loop()
    delay = rtt_ms / 2000
    connecting: set[asyncio.Task[None]] = set()  # the loop keeps only weak references to tasks

    def accepted() -> DelayedPipe:
        client = DelayedPipe(delay)

        async def connect() -> None:
            try:
                _transport, server = await loop.create_connection(lambda: DelayedPipe(delay),
                                                                  upstream_host, upstream_port)
            except OSError as exc:
                log.warning("upstream %s:%d refused: %s", upstream_host, upstream_port, exc)
                if client.transport is not None:
                    client.transport.close()
                return
            server.link(client)
            client.link(server)

        task = loop.create_task(connect())
        connecting.add(task)
        task.add_done_callback(connecting.discard)
        return client

    server = await loop.create_server(accepted, host, port, backlog=1024)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log.info("proxy %s:%d -> %s:%d, +%g ms per round trip", host, port, upstream_host, upstream_port, rtt_ms)
    await stop.wait()
    server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="host:port")
    parser.add_argument("--rtt-ms", type=float, default=20.0, help="added to every round trip (half each way)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s proxy: %(message)s")
    up_host, _, up_port = args.upstream.rpartition(":")
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    runner(serve(args.port, up_host, int(up_port), args.rtt_ms))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
