"""``python -m benchmarks.run``: SQS -> HTTP / Kafka throughput and CPU per message, in one run.

Starts its own LocalStack (and tansu for the Kafka cases) via ``poller.services``, then measures,
each on a fresh queue pre-loaded with the same messages:

- ``boto3``    raw SQS ceiling and the baseline: boto3, N threads, receive(10) + delete batch
- ``lean``     the same with the poller's ``poller.sqs.SqsClient``
- ``http-pP``  the real ``poller run --processes P`` to a minimal HTTP sink (separate process)
- ``kafka-pP`` the real ``poller run --processes P --channel kafka`` to tansu (3 partitions)

Prints a table (msg/s, CPU us/msg, ratios against boto3) and writes it as JSON to
``benchmarks/results/latest.json``. ``--profile`` instead runs one worker in-process under
cProfile (per-thread CPU time) on the SQS -> HTTP path and prints where the CPU goes.
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import logging
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from poller.services import Service, start_sqs, start_tansu

from benchmarks import procstat
from benchmarks.drain import DrainResult, drain_boto3, drain_lean
from benchmarks.peers import (
    REGION,
    Sink,
    consume_count,
    create_queue,
    create_topic,
    make_bodies,
    preload,
    sqs_client,
)
from benchmarks.poller_case import PollerRun, run_poller_case

__all__ = ["CaseResult", "main"]

log = logging.getLogger("benchmarks")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TARGET_US_PER_MSG = 60.0
# The bar was set against boto3's ~190 us/msg on a quiet machine; as a ratio it survives a
# loaded 2-core box, where every absolute figure is inflated (boto3 itself included).
BOTO3_REFERENCE_US = 190.0
TARGET_VS_BOTO3 = TARGET_US_PER_MSG / BOTO3_REFERENCE_US
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_REGION": REGION,
    "AWS_DEFAULT_REGION": REGION,
}


@dataclass(slots=True)
class CaseResult:
    case: str
    description: str
    messages: int
    seconds: float
    cpu_seconds: float
    details: dict[str, Any] = field(default_factory=dict)
    rate_vs_boto3: float | None = None
    cpu_vs_boto3: float | None = None

    @property
    def msg_per_s(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_us_per_msg(self) -> float:
        return self.cpu_seconds / self.messages * 1e6 if self.messages else 0.0

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "msg_per_s": round(self.msg_per_s, 1),
                "cpu_us_per_msg": round(self.cpu_us_per_msg, 1)}


@dataclass(slots=True)
class Bench:
    """What every case shares: the services, the SQS client, the messages, the options."""

    args: argparse.Namespace
    sqs_service: Service
    sqs: Any
    bodies: list[str]
    log_dir: Path
    sink: Sink | None = None
    kafka: Service | None = None

    @property
    def endpoint(self) -> str:
        return self.sqs_service.endpoint

    @property
    def timeout(self) -> float:
        return 60.0 + len(self.bodies) / 100

    def peer_pids(self, **more: int | None) -> dict[str, int]:
        pids = {"localstack": self.sqs_service.pid, **more}
        return {name: pid for name, pid in pids.items() if pid is not None}


# --------------------------------------------------------------------------- cases


def drain_case(bench: Bench, name: str) -> CaseResult:
    drain: Callable[..., DrainResult] = drain_boto3 if name == "boto3" else drain_lean
    url = create_queue(bench.sqs, name)
    preload(bench.sqs, url, bench.bodies)
    peers = bench.peer_pids()
    before = {n: procstat.total_cpu(p) for n, p in peers.items()}
    result = drain(bench.endpoint, url, len(bench.bodies), threads=bench.args.threads, timeout=bench.timeout)
    peer_cpu = {n: procstat.total_cpu(p) - before[n] for n, p in peers.items()}
    client = "boto3" if name == "boto3" else "poller.sqs.SqsClient"
    return CaseResult(
        case=name,
        description=f"{client}, {bench.args.threads} threads: receive(10) + delete_batch (no channel)",
        messages=result.messages, seconds=result.seconds, cpu_seconds=result.cpu_seconds,
        details={"unique_messages": result.unique, "peer_cpu_seconds": peer_cpu},
    )


def _poller_args(bench: Bench, url: str, processes: int) -> list[str]:
    return ["--queue-url", url, "--endpoint-url", bench.endpoint, "--region", REGION,
            "--processes", str(processes), "--log-level", "INFO", *bench.args.poller_arg]


def http_case(bench: Bench, processes: int) -> CaseResult:
    assert bench.sink is not None
    sink = bench.sink
    url = create_queue(bench.sqs, f"http-p{processes}")
    sink.reset()
    expected = len(bench.bodies)
    run = run_poller_case(
        label=f"http-p{processes}",
        args=[*_poller_args(bench, url, processes), "--channel", "http", "--sink", sink.url],
        env=CREDENTIALS, processes=processes, sqs=bench.sqs, queue_url=url, bodies=bench.bodies,
        peers=bench.peer_pids(sink=sink.pid), log_dir=bench.log_dir,
        done=lambda: sink.stats()["unique"] >= expected, timeout=bench.timeout,
    )
    stats = sink.stats()
    return _poller_result(f"http-p{processes}", f"poller run --processes {processes} -> HTTP sink (binary CloudEvents)",
                          run, {"sink_requests": stats["requests"], "sink_unique_events": stats["unique"],
                                "duplicates": stats["requests"] - stats["unique"]})


def kafka_case(bench: Bench, processes: int) -> CaseResult:
    assert bench.kafka is not None
    bootstrap = bench.kafka.endpoint
    url = create_queue(bench.sqs, f"kafka-p{processes}")
    topic = create_topic(bootstrap, partitions=3)
    run = run_poller_case(
        label=f"kafka-p{processes}",
        args=[*_poller_args(bench, url, processes), "--channel", "kafka",
              "--kafka-bootstrap-servers", bootstrap, "--kafka-topic", topic],
        env=CREDENTIALS, processes=processes, sqs=bench.sqs, queue_url=url, bodies=bench.bodies,
        peers=bench.peer_pids(tansu=bench.kafka.pid), log_dir=bench.log_dir,
        done=lambda: True, timeout=bench.timeout,
    )
    records, unique = consume_count(bootstrap, topic, len(bench.bodies))
    return _poller_result(f"kafka-p{processes}",
                          f"poller run --processes {processes} -> Kafka (tansu, 3 partitions, binary)",
                          run, {"kafka_records": records, "kafka_unique_events": unique,
                                "duplicates": records - unique})


def _poller_result(case: str, description: str, run: PollerRun, delivered: dict[str, int]) -> CaseResult:
    details: dict[str, Any] = {
        **delivered,
        "startup_cpu_seconds": round(run.startup_cpu_seconds, 3),
        "supervisor_cpu_seconds": round(run.supervisor_cpu_seconds, 3),
        "worker_cpu_seconds": [round(c, 3) for c in run.worker_cpu_seconds],
        "peer_cpu_seconds": {k: round(v, 3) for k, v in run.peer_cpu_seconds.items()},
        "poller_acked": run.acked, "poller_deleted": run.deleted, "poller_exit_code": run.exit_code,
    }
    if run.exit_code != 0:
        log.warning("%s: the poller exited with code %s", case, run.exit_code)
    return CaseResult(case=case, description=description, messages=run.messages,
                      seconds=run.seconds, cpu_seconds=run.cpu_seconds, details=details)


# --------------------------------------------------------------------------- report


def add_ratios(results: Sequence[CaseResult]) -> None:
    base = next((r for r in results if r.case == "boto3"), None)
    if base is None or not base.msg_per_s or not base.cpu_us_per_msg:
        return
    for r in results:
        r.rate_vs_boto3 = round(r.msg_per_s / base.msg_per_s, 3)
        r.cpu_vs_boto3 = round(r.cpu_us_per_msg / base.cpu_us_per_msg, 3)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def format_table(results: Sequence[CaseResult]) -> str:
    header = (f"{'case':<10} {'msg/s':>8} {'CPU us/msg':>10} {'msg/s vs boto3':>14} "
              f"{'CPU vs boto3':>12} {'wall s':>7} {'LocalStack CPU':>14}  notes")
    lines = [header, "-" * len(header)]
    for r in results:
        peers = r.details.get("peer_cpu_seconds", {})
        ls = peers.get("localstack")
        ls_pct = f"{ls / r.seconds * 100:.0f}% core" if ls is not None and r.seconds else "-"
        lines.append(
            f"{r.case:<10} {r.msg_per_s:>8,.0f} {r.cpu_us_per_msg:>10.1f} {_ratio(r.rate_vs_boto3):>14} "
            f"{_ratio(r.cpu_vs_boto3):>12} {r.seconds:>7.1f} {ls_pct:>14}  {_notes(r)}"
        )
    lines.append(f"target: <= {TARGET_US_PER_MSG:.0f} us/msg SQS -> HTTP on a quiet machine, i.e. "
                 f"<= {TARGET_VS_BOTO3:.2f}x boto3's CPU/msg ({TARGET_US_PER_MSG:.0f} / {BOTO3_REFERENCE_US:.0f} us)")
    return "\n".join(lines)


def _notes(r: CaseResult) -> str:
    d = r.details
    notes = []
    if "sink" in d.get("peer_cpu_seconds", {}) and r.seconds:
        notes.append(f"sink {d['peer_cpu_seconds']['sink'] / r.seconds * 100:.0f}% core")
    if "tansu" in d.get("peer_cpu_seconds", {}) and r.seconds:
        notes.append(f"tansu {d['peer_cpu_seconds']['tansu'] / r.seconds * 100:.0f}% core")
    if d.get("duplicates"):
        notes.append(f"{d['duplicates']} duplicates")
    if "startup_cpu_seconds" in d:
        notes.append(f"start-up {d['startup_cpu_seconds']:.2f} s CPU (not counted)")
    if r.case.startswith(("http", "kafka")) and r.cpu_vs_boto3 is not None:
        verdict = "meets" if r.cpu_vs_boto3 <= TARGET_VS_BOTO3 else "misses"
        notes.append(f"{verdict} the target ({TARGET_VS_BOTO3:.2f}x)")
    return "; ".join(notes)


def write_json(path: Path, bench: Bench, results: Sequence[CaseResult], started: float) -> None:
    doc = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "messages": len(bench.bodies),
        "body_bytes": bench.args.body_size,
        "threads": bench.args.threads,
        "sqs": bench.sqs_service.name,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "target_cpu_us_per_msg": TARGET_US_PER_MSG,
        "target_cpu_vs_boto3": round(TARGET_VS_BOTO3, 3),
        "run_seconds": round(time.monotonic() - started, 1),
        "cases": [r.as_json() for r in results],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    log.info("results written to %s", path)


# --------------------------------------------------------------------------- main


ALL_CASES = ("boto3", "lean", "http", "kafka")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=20_000, help="messages per case (default 20000)")
    p.add_argument("--body-size", type=int, default=200, help="bytes per message body (default 200)")
    p.add_argument("--threads", type=int, default=8, help="threads of the boto3/lean ceilings (default 8)")
    p.add_argument("--processes", default="1,2", help="poller --processes values to run (default 1,2)")
    p.add_argument("--cases", default=",".join(ALL_CASES),
                   help=f"comma-separated subset of {','.join(ALL_CASES)} (default all)")
    p.add_argument("--poller-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for `poller run`, repeatable (e.g. --poller-arg=--receivers=8)")
    p.add_argument("--endpoint-url", default=os.environ.get("SQS_ENDPOINT_URL"),
                   help="use this SQS endpoint instead of starting LocalStack")
    p.add_argument("--kafka-bootstrap-servers", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS"),
                   help="use this broker instead of starting tansu")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "latest.json", help="JSON results file")
    p.add_argument("--profile", action="store_true",
                   help="profile one in-process worker on SQS -> HTTP instead of the benchmark")
    p.add_argument("--profile-messages", type=int, default=10_000, help="messages for --profile")
    p.add_argument("--top", type=int, default=25, help="functions listed by --profile")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(args.cases) - set(ALL_CASES)
    if unknown:
        p.error(f"unknown case(s): {', '.join(sorted(unknown))}")
    args.processes = [int(x) for x in str(args.processes).split(",") if x.strip()]
    return args


@contextlib.contextmanager
def services(args: argparse.Namespace, log_dir: Path) -> Iterator[Bench]:
    with contextlib.ExitStack() as stack:
        sqs_service = stack.enter_context(start_sqs(endpoint=args.endpoint_url, log_dir=log_dir))
        count = args.profile_messages if args.profile else args.messages
        bench = Bench(args=args, sqs_service=sqs_service, sqs=sqs_client(sqs_service.endpoint),
                      bodies=make_bodies(count, args.body_size), log_dir=log_dir)
        if args.profile or "http" in args.cases:
            bench.sink = Sink(log_dir)
            stack.callback(bench.sink.stop)
        if "kafka" in args.cases and not args.profile:
            if args.kafka_bootstrap_servers:
                bench.kafka = Service("external", args.kafka_bootstrap_servers)
            else:
                bench.kafka = stack.enter_context(start_tansu(log_dir=log_dir))
        yield bench


def run_cases(bench: Bench) -> list[CaseResult]:
    plan: list[tuple[str, Callable[[], CaseResult]]] = []
    for name in ("boto3", "lean"):
        if name in bench.args.cases:
            plan.append((name, lambda name=name: drain_case(bench, name)))  # type: ignore[misc]
    for channel, case in (("http", http_case), ("kafka", kafka_case)):
        if channel in bench.args.cases:
            for p in bench.args.processes:
                plan.append((f"{channel}-p{p}", lambda case=case, p=p: case(bench, p)))  # type: ignore[misc]
    results = []
    for name, case_fn in plan:
        log.info("--- case %s: %d messages", name, len(bench.bodies))
        result = case_fn()
        log.info("%s: %.0f msg/s, %.1f us CPU/msg (%.1f s wall, %.2f s CPU)", name, result.msg_per_s,
                 result.cpu_us_per_msg, result.seconds, result.cpu_seconds)
        results.append(result)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    logging.getLogger("botocore").setLevel(logging.WARNING)
    os.environ.pop("AWS_PROFILE", None)
    os.environ.pop("AWS_SESSION_TOKEN", None)
    os.environ.update(CREDENTIALS)  # LocalStack takes any; never send real credentials to it
    started = time.monotonic()
    log_dir = Path(tempfile.mkdtemp(prefix="sqs-poller-bench-"))
    log.info("logs of the services and of each poller run go to %s", log_dir)
    with services(args, log_dir) as bench:
        if args.profile:
            from benchmarks.profiling import profile_http_worker

            profile_http_worker(bench.sqs, bench.endpoint, bench.sink, bench.bodies, top=args.top)  # type: ignore[arg-type]
            return 0
        results = run_cases(bench)
        add_ratios(results)
        print(format_table(results))  # the one print: the result table
        write_json(args.out, bench, results, started)
    log.info("benchmark finished in %.0f s", time.monotonic() - started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
