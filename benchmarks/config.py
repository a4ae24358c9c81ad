"""The suite's settings: one frozen value, from the command line, with a full and a quick preset."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

__all__ = ["CONTENDERS", "SCENARIOS", "SuiteConfig", "parse_args"]

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"

# Scenario keys (see benchmarks/README.md): fast = ceiling, naive, good loop, mq-bridge and the
# poller on the fast sink; slow = the 20 ms sink; remote = SQS behind the delay proxy; start =
# exec -> first event (fast sink).
SCENARIOS = ("fast", "slow", "kafka", "remote", "latency", "rss", "inflight", "start")
CONTENDERS = ("ceiling", "naive", "good", "mq-bridge", "poller")


@dataclass(frozen=True, slots=True)
class SuiteConfig:
    quick: bool = False
    messages: int = 20_000              # fast sink, Kafka, SQS +20 ms, the ceiling, the good loop
    slow_messages: int = 10_000         # the 20 ms sink and the in-flight sweep
    naive_messages: int = 1_000         # the naive loop is ~50x slower: fewer, same bodies
    body_size: int = 200
    threads: int = 8                    # the ceiling's and the good loop's
    processes: tuple[int, ...] = (1, 2)  # poller rows with a fixed --processes, besides its defaults
    sink_delay_ms: float = 20.0
    sqs_rtt_ms: float = 20.0
    latency_rate: float = 300.0
    latency_seconds: float = 30.0
    stall_seconds: float = 60.0
    stall_messages: int = 5_000
    concurrency: tuple[int, ...] = (4, 8, 16, 32, 64, 128, 256)
    repeats: int = 3                    # interleaved windows: best of (fast, 20 ms, Kafka, remote), pooled (latency)
    start_runs: int = 5                 # counted start-up runs per contender (after one warm-up)
    scenarios: tuple[str, ...] = SCENARIOS
    contenders: tuple[str, ...] = CONTENDERS
    poller_args: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()         # --note: context for the report (e.g. "shared with a test run")
    endpoint_url: str | None = None
    kafka_bootstrap: str | None = None
    out_dir: Path = RESULTS_DIR
    results_md: Path | None = BENCH_DIR / "RESULTS.md"   # written by a full run only

    def runs(self, scenario: str, contender: str) -> bool:
        return scenario in self.scenarios and contender in self.contenders

    def timeout(self, messages: int) -> float:
        """Seconds a drain may take: generous (the slowest contender is ~50 msg/s)."""
        return 60.0 + messages / 20


QUICK = SuiteConfig(
    quick=True, messages=2_000, slow_messages=1_000, naive_messages=300, latency_seconds=10.0,
    stall_seconds=20.0, stall_messages=2_000, concurrency=(8, 64, 256), repeats=1, start_runs=3,
    results_md=None,
)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _names(text: str, allowed: Sequence[str], parser: argparse.ArgumentParser, what: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    unknown = set(names) - set(allowed)
    if unknown:
        parser.error(f"unknown {what}: {', '.join(sorted(unknown))} (known: {', '.join(allowed)})")
    return names


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="SQS -> HTTP / Kafka: the poller against mq-bridge and boto3 loops, in one run.")
    p.add_argument("--quick", action="store_true", help="the quick preset (under 5 minutes on 2 cores)")
    p.add_argument("--messages", type=int, help="messages per throughput case (full 20000, quick 2000)")
    p.add_argument("--slow-messages", type=int, help="messages per 20 ms-sink case (full 10000, quick 1000)")
    p.add_argument("--naive-messages", type=int, help="messages for the naive loop (full 1000, quick 300)")
    p.add_argument("--body-size", type=int, help="bytes per message body (200)")
    p.add_argument("--threads", type=int, help="threads of the boto3 ceiling and the good loop (8)")
    p.add_argument("--processes", help="poller --processes rows besides its defaults (1,2)")
    p.add_argument("--concurrency", help="--http-concurrency values of the in-flight sweep")
    p.add_argument("--latency-seconds", type=float, help="seconds of steady load (full 30, quick 10)")
    p.add_argument("--latency-rate", type=float, help="messages per second offered (300)")
    p.add_argument("--stall-seconds", type=float, help="seconds of the stalled sink (full 60, quick 20)")
    p.add_argument("--repeats", type=int,
                   help="interleaved windows each of mq-bridge and the poller's defaults on the fast sink, the "
                        "20 ms sink and Kafka, and of the poller's on SQS +20 ms, the best of each kept; and of "
                        "the latency case, pooled (full 3, quick 1)")
    p.add_argument("--start-runs", type=int,
                   help="counted start-up runs per contender, after a warm-up (full 5, quick 3)")
    p.add_argument("--scenarios", help=f"subset of {','.join(SCENARIOS)}")
    p.add_argument("--contenders", help=f"subset of {','.join(CONTENDERS)}")
    p.add_argument("--poller-arg", action="append", default=[], metavar="ARG",
                   help="extra `poller run` argument for every poller case, repeatable (--poller-arg=--receivers=8)")
    p.add_argument("--endpoint-url", default=os.environ.get("SQS_ENDPOINT_URL"),
                   help="use this SQS endpoint instead of starting LocalStack (env SQS_ENDPOINT_URL)")
    p.add_argument("--kafka-bootstrap-servers", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS"),
                   help="use this broker instead of starting tansu (env KAFKA_BOOTSTRAP_SERVERS)")
    p.add_argument("--out-dir", type=Path, help=f"report, JSON and plots (default {RESULTS_DIR})")
    p.add_argument("--profile", action="store_true",
                   help="profile one in-process poller worker on SQS -> HTTP instead (see README)")
    p.add_argument("--profile-messages", type=int, default=10_000, help="messages for --profile")
    p.add_argument("--top", type=int, default=25, help="functions listed by --profile")
    p.add_argument("--note", action="append", default=[], metavar="TEXT",
                   help="a line for the report's notes, repeatable (e.g. what else ran on the box)")
    p.add_argument("--log-level", default="INFO")
    return p


def parse_args(argv: Sequence[str] | None) -> tuple[SuiteConfig, argparse.Namespace]:
    p = parser()
    args = p.parse_args(argv)
    config = QUICK if args.quick else SuiteConfig()
    changes: dict[str, object] = {}
    for name in ("messages", "slow_messages", "naive_messages", "body_size", "threads",
                 "latency_seconds", "latency_rate", "stall_seconds", "repeats", "start_runs", "out_dir"):
        value = getattr(args, name)
        if value is not None:
            changes[name] = value
    if args.processes:
        changes["processes"] = _ints(args.processes)
    if args.concurrency:
        changes["concurrency"] = _ints(args.concurrency)
    if args.scenarios:
        changes["scenarios"] = _names(args.scenarios, SCENARIOS, p, "scenario")
    if args.contenders:
        changes["contenders"] = _names(args.contenders, CONTENDERS, p, "contender")
    partial = bool(args.scenarios or args.contenders)
    config = replace(config, **changes, poller_args=tuple(args.poller_arg), notes=tuple(args.note),  # type: ignore[arg-type]
                     endpoint_url=args.endpoint_url,
                     kafka_bootstrap=args.kafka_bootstrap_servers,
                     results_md=None if partial else config.results_md)
    return config, args
