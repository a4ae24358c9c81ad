"""``python -m benchmarks.run [--quick]``: the poller against mq-bridge and plain boto3, in one run.

Starts (or reuses) LocalStack and tansu via ``poller.kit.localsqs`` / ``localkafka``, its own HTTP sinks (at once,
20 ms, stalled) and an SQS delay proxy, then measures every contender the same way (see
``benchmarks/measure.py``) and writes ``benchmarks/results/report.md``, ``latest.json`` and PNG
plots; a full run also writes ``benchmarks/RESULTS.md``. ``--profile`` instead profiles one poller
worker in-process. See benchmarks/README.md.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from benchmarks import procstat
from benchmarks.config import SuiteConfig, parse_args
from benchmarks.contenders import CREDENTIALS
from benchmarks.keys import make_bodies
from benchmarks.peers import DelayProxy, Sink
from benchmarks.plots import plot_all
from benchmarks.progress import bars_and_logs
from benchmarks.report import (
    RunReport,
    format_text,
    git_commit,
    machine_summary,
    render_markdown,
    write_json,
)
from benchmarks.scenarios import (
    Bench,
    inflight_sweep,
    latency_cases,
    rss_case,
    start_cases,
    throughput_cases,
)
from benchmarks.sqs import sqs_client
from poller.kit.localkafka import start_tansu
from poller.kit.localsqs import start_sqs
from poller.kit.process import Service

__all__ = ["main"]

log = logging.getLogger("benchmarks")


def _port(url: str) -> int:
    parts = urlsplit(url if "://" in url else f"tcp://{url}")
    return parts.port or (443 if parts.scheme == "https" else 80)


def _pid_of(service: Service, endpoint: str) -> int | None:
    """The service's pid: ours, or (an external one on this host) whoever listens on its port."""
    return service.pid if service.pid is not None else procstat.listener_pid(_port(endpoint))


@contextlib.contextmanager
def services(config: SuiteConfig, log_dir: Path) -> Iterator[Bench]:
    """Every peer of the run, started once and stopped by pid at the end."""
    wanted = set(config.scenarios)
    with contextlib.ExitStack() as stack:
        sqs_service = stack.enter_context(start_sqs(endpoint=config.endpoint_url, log_dir=log_dir))
        endpoint = sqs_service.endpoint
        count = max(config.messages, config.slow_messages, config.naive_messages, config.stall_messages)
        bench = Bench(config=config, sqs=sqs_client(endpoint), endpoint=endpoint, log_dir=log_dir,
                      bodies=make_bodies(count, config.body_size))
        pid = _pid_of(sqs_service, endpoint)
        if pid is not None:
            bench.peers["localstack"] = pid
        else:
            log.warning("LocalStack's pid is unknown (not on this host?): its CPU is not reported")

        def sink(name: str, **kwargs: object) -> Sink:
            started = Sink(name, log_dir, **kwargs)  # type: ignore[arg-type]
            stack.callback(started.stop)
            return started

        if wanted & {"fast", "latency", "remote", "start"}:
            bench.fast = sink("sink-fast")
        if wanted & {"slow", "inflight"}:
            bench.slow = sink("sink-20ms", delay_ms=config.sink_delay_ms)
        if "rss" in wanted:
            bench.stall = sink("sink-stalled", stall=True)
        if "remote" in wanted:
            bench.proxy = DelayProxy(f"{urlsplit(endpoint).hostname}:{_port(endpoint)}", config.sqs_rtt_ms, log_dir)
            stack.callback(bench.proxy.stop)
        if "kafka" in wanted:
            if config.kafka_bootstrap:
                kafka = Service("external", config.kafka_bootstrap)
            else:
                kafka = stack.enter_context(start_tansu(log_dir=log_dir))
            bench.kafka = kafka.endpoint
            bench.tansu_pid = _pid_of(kafka, kafka.endpoint)
        log.info("SQS %s (%s), sinks and proxy up; logs in %s", endpoint, sqs_service.name, log_dir)
        yield bench


def _sqs_name(bench: Bench, config: SuiteConfig) -> str:
    where = "given endpoint" if config.endpoint_url else "started by the run"
    return f"LocalStack at {bench.endpoint} ({where})"


def run_suite(config: SuiteConfig, log_dir: Path) -> RunReport:
    started_at = dt.datetime.now(dt.UTC)
    started = time.monotonic()
    machine = machine_summary()  # before the run: its load average is the box's, not ours
    commit = git_commit(Path(__file__).resolve().parent.parent)  # the code that is measured
    with services(config, log_dir) as bench:
        start = start_cases(bench)  # first: the box is at its quietest before the drains
        rows = throughput_cases(bench)
        sweep = inflight_sweep(bench)
        latency = latency_cases(bench)
        rss = rss_case(bench)
        sqs = _sqs_name(bench, config)
    kind = "quick" if config.quick else "full"
    title = f"sqs-poller vs mq-bridge and boto3, {kind} run {started_at:%Y-%m-%d %H:%M} UTC ({os.cpu_count()} CPUs)"
    plots = plot_all(config.out_dir, rows, sweep, rss, config.sink_delay_ms, title, start=start)
    notes = config.notes
    if git_commit(Path(__file__).resolve().parent.parent) != commit:  # each row imports the code afresh
        notes += (f"the code under test changed during the run (it started at {commit}): rows may "
                  "have measured different code",)
    return RunReport(config=config, started=started_at, seconds=time.monotonic() - started, sqs=sqs,
                     rows=tuple(rows), sweep=tuple(sweep), latency=tuple(latency), rss=rss, start=tuple(start),
                     plots=tuple(plots), log_dir=str(log_dir), machine=machine,
                     commit=commit, notes=notes)


def write_outputs(report: RunReport) -> None:
    config = report.config
    out = config.out_dir
    write_json(out / "latest.json", report)
    (out / "report.md").write_text(render_markdown(report))
    log.info("report: %s (JSON: %s)", out / "report.md", out / "latest.json")
    if config.results_md is not None:  # a full run of every scenario: the committed record
        full = config.results_md.parent / "results" / "full"
        full.mkdir(parents=True, exist_ok=True)
        for name in report.plots:
            shutil.copyfile(out / name, full / name)
        config.results_md.write_text(render_markdown(report, image_prefix="results/full/"))
        log.info("full run: %s updated", config.results_md)


def _profile(config: SuiteConfig, log_dir: Path, messages: int, top: int) -> int:
    from benchmarks.profiling import (
        profile_http_worker,  # imports poller internals: only here
    )

    with contextlib.ExitStack() as stack:
        sqs_service = stack.enter_context(start_sqs(endpoint=config.endpoint_url, log_dir=log_dir))
        sink = Sink("sink-fast", log_dir)
        stack.callback(sink.stop)
        profile_http_worker(sqs_client(sqs_service.endpoint), sqs_service.endpoint, sink,
                            make_bodies(messages, config.body_size), top=top)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    config, args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    for noisy in ("botocore", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.pop("AWS_PROFILE", None)
    os.environ.pop("AWS_SESSION_TOKEN", None)
    os.environ.update(CREDENTIALS)  # LocalStack takes any; never send real credentials to it
    log_dir = Path(tempfile.mkdtemp(prefix="sqs-poller-bench-"))
    log.info("logs of the services and of every contender go to %s", log_dir)
    if args.profile:
        return _profile(config, log_dir, args.profile_messages, args.top)
    with bars_and_logs():
        try:
            report = run_suite(config, log_dir)
        except KeyboardInterrupt:  # every child was stopped on the way out (context managers)
            log.error("interrupted; no report written (logs in %s)", log_dir)
            return 130
        write_outputs(report)
    print(format_text(report))  # the one print: the result table
    log.info("benchmark finished in %.1f minutes", report.seconds / 60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
