"""Run one mq-bridge route until SIGTERM: ``python mqbridge_route.py ROUTE.json``.

Executed by the Python of mq-bridge's own venv (see ``benchmarks/mqbridge.py``), so it uses the
standard library and ``mq_bridge`` only, never the project. The route runs in mq-bridge's Rust
runtime (tokio); this interpreter only starts it, prints ``ready`` and waits for the signal.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading

import mq_bridge

log = logging.getLogger("mqbridge_route")


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    mq_bridge.init_logging("warn")  # the route's warnings and errors into this log
    with open(argv[1]) as f:
        config = json.load(f)
    route = mq_bridge.Route.from_config(config, "bench")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    route.start()  # deploys the route (connections checked) and returns; errors surface here
    log.info("ready: mq-bridge %s route %s", mq_bridge.__version__, json.dumps(config))
    while not stop.wait(0.5):
        pass
    route.stop()
    route.join()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
