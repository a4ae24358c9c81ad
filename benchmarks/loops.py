"""The plain-boto3 contenders, each the way a user would write it, run as a child process:

``python -m benchmarks.loops {ceiling,naive,good} --endpoint-url E --queue-url Q [--sink URL] [--threads 8]``

- ``ceiling``: the raw SQS ceiling. One boto3 client, N threads, ``receive_message(10, long
  poll, all attributes)`` + ``delete_message_batch``; no channel at all.
- ``naive``: the loop everyone writes first. One thread: receive 1, ``requests.post`` one
  CloudEvent (a new connection each time, as the module-level call does), delete 1.
- ``good``: a careful boto3 loop. One boto3 Session and client, one ``requests.Session``
  (keep-alive pool of N), N threads: receive 10, POST each as a CloudEvent, delete the acked
  ones with ``delete_message_batch``.

The events are binary-mode CloudEvents with the whole SQS message as JSON data, like the
poller's defaults, built with the standard library's ``json``. Each prints ``ready`` once its
clients are built and its threads start polling, and runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

import boto3
import requests
from botocore.config import Config

__all__ = ["cloudevent", "main"]

log = logging.getLogger("benchmarks.loops")

REGION = "us-east-1"
WAIT_TIME = 20


def cloudevent(message: dict[str, Any], source: str) -> tuple[dict[str, str], bytes]:
    """Binary-mode CloudEvent of one received message: (headers, body)."""
    attrs = message.get("Attributes", {})
    sent_ms = int(attrs.get("SentTimestamp", "0"))
    time = dt.datetime.fromtimestamp(sent_ms / 1000, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    data = {k: v for k, v in message.items() if k != "ReceiptHandle"}
    headers = {
        "ce-specversion": "1.0", "ce-id": message["MessageId"], "ce-source": source,
        "ce-type": "aws.sqs.message", "ce-time": time, "content-type": "application/json",
    }
    return headers, json.dumps(data).encode()


def _client(endpoint: str, pool: int) -> Any:
    session = boto3.Session(aws_access_key_id="test", aws_secret_access_key="test", region_name=REGION)
    return session.client("sqs", endpoint_url=endpoint,
                          config=Config(retries={"max_attempts": 5, "mode": "standard"}, max_pool_connections=pool))


def _receive(sqs: Any, url: str, count: int) -> list[dict[str, Any]]:
    return list(sqs.receive_message(
        QueueUrl=url, MaxNumberOfMessages=count, WaitTimeSeconds=WAIT_TIME,
        AttributeNames=["All"], MessageAttributeNames=["All"],
    ).get("Messages", []))


def _delete_batch(sqs: Any, url: str, messages: list[dict[str, Any]]) -> None:
    if messages:
        sqs.delete_message_batch(QueueUrl=url, Entries=[
            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)])


def ceiling_round(sqs: Any, url: str) -> Callable[[], None]:
    def one() -> None:
        _delete_batch(sqs, url, _receive(sqs, url, 10))
    return one


def naive_round(sqs: Any, url: str, sink: str) -> Callable[[], None]:
    def one() -> None:
        for message in _receive(sqs, url, 1):
            headers, body = cloudevent(message, url)
            if requests.post(sink, data=body, headers=headers, timeout=30).ok:
                sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    return one


def good_round(sqs: Any, url: str, sink: str, session: requests.Session) -> Callable[[], None]:
    def one() -> None:
        acked = []
        for message in _receive(sqs, url, 10):
            headers, body = cloudevent(message, url)
            if session.post(sink, data=body, headers=headers, timeout=30).ok:
                acked.append(message)
        _delete_batch(sqs, url, acked)
    return one


def _loop(one_round: Callable[[], None], stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            one_round()
        except Exception as exc:  # noqa: BLE001 - a loop that dies would stall the case; log and go on
            log.warning("round failed: %r", exc)
            stop.wait(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("kind", choices=("ceiling", "naive", "good"))
    parser.add_argument("--endpoint-url", required=True)
    parser.add_argument("--queue-url", required=True)
    parser.add_argument("--sink", help="HTTP sink (naive, good)")
    parser.add_argument("--threads", type=int, default=8, help="threads of ceiling and good (naive: 1)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("botocore").setLevel(logging.WARNING)
    if args.kind != "ceiling" and not args.sink:
        parser.error(f"{args.kind} needs --sink")

    threads = 1 if args.kind == "naive" else args.threads
    sqs = _client(args.endpoint_url, pool=threads * 2)  # boto3 clients are thread-safe: one, as users do
    if args.kind == "ceiling":
        one_round = ceiling_round(sqs, args.queue_url)
    elif args.kind == "naive":
        one_round = naive_round(sqs, args.queue_url, args.sink)
    else:
        session = requests.Session()
        session.mount("http://", requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=threads))
        one_round = good_round(sqs, args.queue_url, args.sink, session)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    for i in range(threads):
        threading.Thread(target=_loop, args=(one_round, stop), name=f"{args.kind}-{i}", daemon=True).start()
    log.info("ready: %s loop, %d thread(s)", args.kind, threads)
    while not stop.wait(0.5):  # a timeout, so the signal handler surely gets its turn
        pass
    log.info("stopping")  # threads are daemons, possibly in a long poll: not waited for
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
