"""The Kafka channel's own CPU per message, without SQS: one ``KafkaChannel`` (default settings)
on a uvloop event loop, fed the way a worker feeds it (one ``publish`` per message of a standard
queue, receives of 10, at most ``--max-in-flight`` unreported), into a new topic on tansu.

    .venv/bin/python -m benchmarks.kafka_channel --messages 20000 --rounds 3
    .venv/bin/python -m benchmarks.kafka_channel --kafka-bootstrap-servers 127.0.0.1:9092

Prints, per round, the rate and the CPU per message of the whole process and of each thread
group (the loop's thread, the channel's poll thread, librdkafka's own threads), from
``/proc/self/task/<tid>/stat``. The worker's SQS work is not here: compare rounds of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
import uuid
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import uvloop

from benchmarks.procstat import thread_cpu_seconds
from channels.base import Message, Outcome
from channels.kafka.channel import KafkaChannel
from channels.kafka.config import KafkaConfig

log = logging.getLogger("benchmarks.kafka_channel")

def _thread_cpu(names: Mapping[int, str]) -> dict[str, float]:
    """CPU seconds (utime + stime) per thread group of this process: ``names`` by native id, else
    librdkafka's threads by their prefix, else "other"."""
    by_name: dict[str, float] = defaultdict(float)
    for tid in os.listdir("/proc/self/task"):
        seconds = thread_cpu_seconds(int(tid))
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
        except OSError:
            continue
        if seconds is None:
            continue
        group = names.get(int(tid)) or ("librdkafka" if name.startswith("rdk:") else "other")
        by_name[group] += seconds
    return by_name


def _messages(n: int, body_size: int) -> list[Message]:
    now = str(int(time.time() * 1000))
    body = "x" * body_size
    return [
        Message(
            id=str(uuid.uuid4()), body=body, ack_id=f"receipt-{i}",
            attributes={"SentTimestamp": now, "ApproximateReceiveCount": "1",
                        "ApproximateFirstReceiveTimestamp": now, "SenderId": "000000000000"},
            message_attributes={"origin": {"DataType": "String", "StringValue": "bench"}},
        )
        for i in range(n)
    ]


@dataclass(frozen=True)
class Round:
    messages: int
    seconds: float
    cpu: float
    threads: dict[str, float]


async def _drive(channel: KafkaChannel, messages: Sequence[Message], max_in_flight: int, rate: float) -> float:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    room = asyncio.Event()
    state = {"unreported": 0, "reported": 0, "failed": 0}

    def report(message: Message, outcome: Outcome, reason: str = "", retry_after: float = 0.0) -> None:
        state["unreported"] -= 1
        state["reported"] += 1
        if outcome is not Outcome.ACK:
            state["failed"] += 1
            log.warning("message %s: %s %s", message.id, outcome, reason)
        if state["unreported"] <= max_in_flight - 10:
            room.set()
        if state["reported"] == len(messages) and not done.done():
            done.set_result(None)

    started = time.perf_counter()
    for i in range(0, len(messages), 10):
        if rate:  # SQS's pace: a receive of 10 every 10 / rate seconds
            due = started + i / rate - time.perf_counter()
            if due > 0:
                await asyncio.sleep(due)
        while state["unreported"] > max_in_flight - 10:
            room.clear()
            await room.wait()
        for message in messages[i:i + 10]:
            state["unreported"] += 1
            channel.publish([message], report)
        await asyncio.sleep(0)  # a receive's answer: one loop turn apart
    await asyncio.wait_for(done, 120)
    if state["failed"]:
        raise SystemExit(f"{state['failed']} message(s) not acked")
    return time.perf_counter() - started


def _round(runner: asyncio.Runner, channel: KafkaChannel, args: argparse.Namespace, n: int) -> Round:
    messages = _messages(n, args.body_size)
    names = {os.getpid(): "loop"}
    poller = getattr(channel, "_poller", None)  # the poll thread, while the channel has one
    if poller is not None and poller.native_id is not None:
        names[poller.native_id] = "kafka-poll"
    before, cpu0 = _thread_cpu(names), time.process_time()
    seconds = runner.run(_drive(channel, messages, args.max_in_flight, args.rate))
    cpu = time.process_time() - cpu0
    after = _thread_cpu(names)
    return Round(n, seconds, cpu, {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--body-size", type=int, default=200)
    parser.add_argument("--max-in-flight", type=int, default=100)
    parser.add_argument("--rate", type=float, default=2000.0, help="messages a second given (0: as fast as it goes)")
    parser.add_argument("--kafka-bootstrap-servers", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    service = None
    bootstrap = args.kafka_bootstrap_servers
    if not bootstrap:
        from poller.kit.localkafka import start_tansu

        service = start_tansu()
        bootstrap = service.endpoint
    try:
        config = KafkaConfig(bootstrap_servers=bootstrap, topic=f"bench-{uuid.uuid4().hex[:8]}", create_topic=True)
        channel = config.create("arn:aws:sqs:us-east-1:000000000000:bench")
        channel.start()
        # One loop for every round: the channel reports to the loop of its first publish.
        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
        try:
            _round(runner, channel, args, 1000)  # warm-up: connections, metadata
            for i in range(args.rounds):
                r = _round(runner, channel, args, args.messages)
                threads = "  ".join(f"{k} {v / r.messages * 1e6:.1f}" for k, v in sorted(r.threads.items()) if v)
                print(f"round {i + 1}: {r.messages / r.seconds:,.0f} msg/s  CPU {r.cpu / r.messages * 1e6:.1f} us/msg"
                      f"  (per thread, us/msg: {threads})", flush=True)
        finally:
            channel.close(10)
            runner.close()
    finally:
        if service is not None:
            service.stop()


if __name__ == "__main__":
    main()
