"""The suite's cases: which contender, against which peer, with which queue contents.

Every throughput case gets a fresh queue pre-loaded with the first N of the same bodies and
is cut by ``benchmarks.measure``; the sinks, LocalStack, tansu and the proxy are the run's own,
shared by every contender. A case that fails is recorded with its error and the run goes on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks import mqbridge
from benchmarks.config import SuiteConfig
from benchmarks.contender import ContenderProcess, ContenderSpec
from benchmarks.contenders import (
    LOOP_LABELS,
    HttpTarget,
    KafkaTarget,
    PollerOptions,
    loop_spec,
    poller_label,
    poller_spec,
)
from benchmarks.keys import stamped_body
from benchmarks.measure import drain_window, queue_progress, sink_progress
from benchmarks.model import (
    CEILING,
    FAST,
    INFLIGHT,
    KAFKA,
    REMOTE,
    SLOW,
    Latency,
    RssRun,
    StartRun,
    Throughput,
)
from benchmarks.peers import DelayProxy, Sink, consume_count, create_topic
from benchmarks.progress import bar
from benchmarks.sqs import REGION, fresh_queue, preload, send_batch
from benchmarks.startup import StartSample, first_event

__all__ = ["Bench", "LatencyWindow", "best_of", "inflight_sweep", "latency_cases", "pooled_latency", "rss_case",
           "start_cases", "throughput_cases"]

log = logging.getLogger(__name__)

SpecFactory = Callable[[str], ContenderSpec]  # queue URL -> contender
RSS_WARMUP_S = 2.0  # the poller fills its in-flight window first; RSS is flat from there or not


@dataclass(slots=True)
class Bench:
    """What every case shares: settings, the SQS client and endpoint, the peers, the bodies."""

    config: SuiteConfig
    sqs: Any
    endpoint: str
    log_dir: Path
    bodies: list[str]
    peers: dict[str, int] = field(default_factory=dict)   # localstack's pid, when known: every case
    tansu_pid: int | None = None                          # the Kafka cases' peer
    fast: Sink | None = None
    slow: Sink | None = None
    stall: Sink | None = None
    kafka: str | None = None
    proxy: DelayProxy | None = None
    mq_pythons: dict[mqbridge.MqBridge, Path | str] = field(default_factory=dict)  # venv Python, or why not

    def poller(self, queue_url: str, target: HttpTarget | KafkaTarget, *, processes: int | None = None,
               extra: tuple[str, ...] = (), label: str | None = None, endpoint: str | None = None) -> ContenderSpec:
        return poller_spec(endpoint or self.endpoint, queue_url, target, label=label,
                           options=PollerOptions(processes=processes, extra=extra), common=self.config.poller_args)

    def config_path(self, name: str) -> Path:
        return self.log_dir / f"{name}-{time.monotonic_ns() % 10**9}.json"

    def mq_bridge(self, bridge: mqbridge.MqBridge, route: dict[str, Any], name: str) -> ContenderSpec:
        """mq-bridge on ``route``; installed once per run at most: a failed install skips every row of it."""
        python = self.mq_pythons.get(bridge)
        if python is None:
            try:
                python = mqbridge.ensure_installed(bridge)
            except Exception as exc:  # noqa: BLE001 - the reason, in one line, is the rows' note
                python = f"skipped: {_first_line(exc)}"
                log.warning("mq-bridge rows %s", python)
            self.mq_pythons[bridge] = python
        if isinstance(python, str):
            raise Skipped(python)
        return mqbridge.spec(bridge, python, route, self.config_path(name))


class Skipped(Exception):
    """A case that cannot run here (its one-line reason is the row's note), not one that failed."""


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:40]


def _first_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:300]


def run_throughput(bench: Bench, scenario: str, family: str, label: str, make_spec: SpecFactory, *,
                   count: int, sink: Sink | None = None, topic: str | None = None) -> Throughput:
    with fresh_queue(bench.sqs, _slug(f"{scenario}-{label}")) as url:
        return _throughput(bench, url, scenario, family, label, make_spec, count=count, sink=sink, topic=topic)


def _throughput(bench: Bench, url: str, scenario: str, family: str, label: str, make_spec: SpecFactory, *,
                count: int, sink: Sink | None, topic: str | None) -> Throughput:
    bodies = bench.bodies[:count]
    peers = dict(bench.peers)
    if sink is not None:
        sink.reset()
        peers["sink"] = sink.pid
    if scenario == REMOTE and bench.proxy is not None:
        peers["proxy"] = bench.proxy.pid
    if topic is not None and bench.tansu_pid is not None:
        peers["tansu"] = bench.tansu_pid
    try:
        spec = make_spec(url)
        label = spec.label
        progress = (sink_progress(sink, bench.sqs, url, count) if sink is not None
                    else queue_progress(bench.sqs, url, count))
        window = drain_window(spec, sqs=bench.sqs, queue_url=url, bodies=bodies, progress=progress,
                              peers=peers, log_dir=bench.log_dir, timeout=bench.config.timeout(count))
    except Skipped as exc:
        return Throughput(scenario, label, family, count, error=str(exc))
    except Exception as exc:
        log.error("%s / %s failed: %s", scenario, label, _first_line(exc))
        log.debug("details", exc_info=True)
        return Throughput(scenario, label, family, count, error=_first_line(exc))
    details: dict[str, Any] = {**window.details(), "settings": dict(spec.settings)}
    unique = count
    if sink is not None:
        stats = sink.stats()
        unique = stats["unique"]
        details.update(sink_requests=stats["requests"], delivered=unique, duplicates=stats["requests"] - unique)
    if topic is not None and bench.kafka is not None:
        records, unique = consume_count(bench.kafka, topic, count)
        details.update(kafka_records=records, delivered=unique, duplicates=records - unique)
    error = None if unique >= count else f"only {unique} of {count} distinct messages arrived"
    if family == "poller":  # how many workers it ran is seen, not assumed (they may follow the load)
        details["workers_seen"] = list(window.workers_seen)
    result = Throughput(scenario, label, family, count, window.seconds, window.cpu_seconds,
                        window.peer_cpu_seconds, details, error)
    log.info("%-22s %-26s %7.0f msg/s %7.1f us CPU/msg  (%.1f s)%s", scenario, label, result.msg_per_s,
             result.cpu_us_per_msg, result.seconds, f"  ERROR {error}" if error else "")
    return result


# --------------------------------------------------------------------------- throughput


def _poller_default_row(bench: Bench, scenario: str, sink: Sink, count: int) -> Throughput:
    """The poller's defaults (how many workers they ran is in the row's notes)."""
    target = HttpTarget(sink.url)
    return run_throughput(bench, scenario, "poller", "poller defaults", lambda url: bench.poller(url, target),
                          count=count, sink=sink)


def _poller_process_rows(bench: Bench, scenario: str, sink: Sink, count: int) -> list[Throughput]:
    """Each ``--processes`` value: a fixed count, which the defaults need not be."""
    target = HttpTarget(sink.url)
    return [run_throughput(bench, scenario, "poller", poller_label(p),
                           lambda url, p=p: bench.poller(url, target, processes=p), count=count, sink=sink)
            for p in bench.config.processes]


def best_of(repeats: int, cases: list[Callable[[], Throughput]]) -> list[Throughput]:
    """Each case ``repeats`` times, the cases interleaved (A B A B: the box's drift falls on both), and
    for each the window with the least CPU per message, the others named in its notes.

    Why: each contender's CPU per message follows the box's pace in its window, and the pace
    moves between consecutive windows (benchmarks/README.md): each window's note gives
    LocalStack's CPU per message in it, the same window's measure of that pace. Taking each
    one's best window is the same rule for both and does not flatter the poller."""
    tries: list[list[Throughput]] = [[] for _ in cases]
    for _ in range(max(1, repeats)):
        for i, case in enumerate(cases):
            tries[i].append(case())
    out = []
    for rows in tries:
        good = [r for r in rows if r.ok]
        if not good or len(rows) == 1:
            out.append(rows[-1])
            continue
        best = min(good, key=lambda r: r.cpu_us_per_msg)
        windows = [_window_text(r) if r.ok else "failed" for r in rows]
        out.append(replace(best, details={**best.details, "windows": windows,
                                          "notes": [*best.details.get("notes", ()),
                                                    f"best of {len(rows)} windows: {'; '.join(windows)}"]}))
    return out


def _window_text(row: Throughput) -> str:
    text = f"{row.cpu_us_per_msg:.1f} us/msg at {row.msg_per_s:,.0f} msg/s"
    localstack = row.peer_cpu_seconds.get("localstack")
    if localstack is not None and row.messages:
        text += f" (LocalStack {localstack / row.messages * 1e6:.0f} us/msg)"
    return text


def _relabel(row: Throughput, label: str, **details: Any) -> Throughput:
    return replace(row, contender=label, details={**row.details, **details})


def _mqbridge_http(bench: Bench, scenario: str, sink: Sink, count: int, endpoint: str | None = None,
                   proxy: DelayProxy | None = None) -> Throughput:
    def make(url: str) -> ContenderSpec:
        queue_url, sqs_endpoint = (proxy.url(url), proxy.url(bench.endpoint)) if proxy else (url, bench.endpoint)
        route = mqbridge.http_route(queue_url, endpoint or sqs_endpoint, REGION, sink.url)
        return bench.mq_bridge(mqbridge.BASIC, route, "mq-bridge-http")
    return run_throughput(bench, scenario, "mq-bridge", "mq-bridge", make, count=count, sink=sink)


def throughput_cases(bench: Bench) -> list[Throughput]:
    c = bench.config
    rows: list[Throughput] = []
    if bench.fast is not None and "fast" in c.scenarios:
        fast = bench.fast
        if c.runs("fast", "ceiling"):
            rows.append(run_throughput(bench, CEILING, "ceiling", "boto3 ceiling",
                                       lambda url: loop_spec("ceiling", bench.endpoint, url, threads=c.threads),
                                       count=c.messages))
        if c.runs("fast", "naive"):
            rows.append(run_throughput(bench, FAST, "naive", "naive loop",
                                       lambda url: loop_spec("naive", bench.endpoint, url, sink=fast.url),
                                       count=c.naive_messages, sink=fast))
        if c.runs("fast", "good"):
            rows.append(run_throughput(bench, FAST, "good", "good boto3 loop",
                                       lambda url: loop_spec("good", bench.endpoint, url, sink=fast.url,
                                                             threads=c.threads),
                                       count=c.messages, sink=fast))
        pair: list[Callable[[], Throughput]] = []
        if c.runs("fast", "mq-bridge"):
            pair.append(lambda: _mqbridge_http(bench, FAST, fast, c.messages))
        if c.runs("fast", "poller"):
            pair.append(lambda: _poller_default_row(bench, FAST, fast, c.messages))
            if _remote_poller_wanted(bench):  # its target is a ratio to the direct row: same rounds
                pair.append(lambda: _poller_remote_row(bench))
        rows += best_of(c.repeats, pair)
        if c.runs("fast", "poller"):
            rows += _poller_process_rows(bench, FAST, fast, c.messages)
    if bench.slow is not None and "slow" in c.scenarios:
        slow = bench.slow
        pair = []
        if c.runs("slow", "mq-bridge"):
            pair.append(lambda: _mqbridge_http(bench, SLOW, slow, c.slow_messages))
        if c.runs("slow", "poller"):
            pair.append(lambda: _poller_default_row(bench, SLOW, slow, c.slow_messages))
        rows += best_of(c.repeats, pair)
        if c.runs("slow", "poller"):
            rows += _poller_process_rows(bench, SLOW, slow, c.slow_messages)
    if bench.kafka is not None and "kafka" in c.scenarios:
        rows += _kafka_rows(bench)
    if bench.proxy is not None and bench.fast is not None and "remote" in c.scenarios:
        proxy, fast = bench.proxy, bench.fast
        if c.runs("remote", "mq-bridge"):  # context only (~400 msg/s: a long window), so once
            rows.append(_mqbridge_http(bench, REMOTE, fast, c.messages, proxy=proxy))
        if _remote_poller_wanted(bench) and not c.runs("fast", "poller"):  # else with the direct row
            rows += best_of(c.repeats, [lambda: _poller_remote_row(bench)])
    return rows


def _remote_poller_wanted(bench: Bench) -> bool:
    return bench.proxy is not None and bench.fast is not None and bench.config.runs("remote", "poller")


def _poller_remote_row(bench: Bench) -> Throughput:
    """The poller's defaults with SQS behind the delay proxy. Its target is its rate over the
    direct row's, so its windows are interleaved with those (A B A B): drawn minutes apart, the
    two once ran at paces 1.8x apart (51 vs 94 us of CPU per message, the same code)."""
    proxy, fast = bench.proxy, bench.fast
    assert proxy is not None and fast is not None
    return run_throughput(
        bench, REMOTE, "poller", "poller defaults",
        lambda url: bench.poller(proxy.url(url), HttpTarget(fast.url), endpoint=proxy.url(bench.endpoint)),
        count=bench.config.messages, sink=fast)


def _kafka_rows(bench: Bench) -> list[Throughput]:
    c, bootstrap = bench.config, bench.kafka
    assert bootstrap is not None

    def mq_row() -> Throughput:
        topic = create_topic(bootstrap, partitions=3)

        def make_mq(url: str) -> ContenderSpec:
            route = mqbridge.kafka_route(url, bench.endpoint, REGION, bootstrap, topic)
            return bench.mq_bridge(mqbridge.FULL, route, "mq-bridge-kafka")
        return run_throughput(bench, KAFKA, "mq-bridge", "mq-bridge", make_mq, count=c.messages, topic=topic)

    def poller_row() -> Throughput:
        topic = create_topic(bootstrap, partitions=3)
        return run_throughput(bench, KAFKA, "poller", "poller defaults",
                              lambda url: bench.poller(url, KafkaTarget(bootstrap, topic)), count=c.messages,
                              topic=topic)

    pair: list[Callable[[], Throughput]] = []
    if c.runs("kafka", "mq-bridge"):
        pair.append(mq_row)
    if c.runs("kafka", "poller"):
        pair.append(poller_row)
    return best_of(c.repeats, pair)


def inflight_sweep(bench: Bench) -> list[Throughput]:
    """The poller, one process, on the 20 ms sink, at each ``--http-concurrency``: the only flag set."""
    c = bench.config
    if bench.slow is None or not c.runs("inflight", "poller"):
        return []
    slow = bench.slow
    rows = []
    for n in c.concurrency:
        row = run_throughput(bench, INFLIGHT, "poller", f"poller p1 c{n}",
                             lambda url, n=n: bench.poller(url, HttpTarget(slow.url), processes=1,
                                                           extra=("--http-concurrency", str(n)),
                                                           label=f"poller p1 c{n}"),
                             count=c.slow_messages, sink=slow)
        rows.append(_relabel(row, row.contender, concurrency=n, processes_flag=1))
    return rows


# --------------------------------------------------------------------------- latency


def _percentile(values: Sequence[int], q: float) -> float:
    """Nearest rank (values sorted)."""
    if not values:
        return 0.0
    return float(values[min(len(values) - 1, max(0, round(q * len(values) + 0.5) - 1))])


def _send_steadily(bench: Bench, url: str, label: str) -> tuple[int, float]:
    """``rate`` messages a second for ``seconds``, stamped at send time, in small batches (<= 10,
    whatever is due: at 300/s a batch of ~3 every 10 ms). Returns (sent, seconds)."""
    c = bench.config
    total = int(c.latency_rate * c.latency_seconds)
    sent = 0
    started = time.monotonic()
    with bar(total=total, desc=f"steady load {label}") as progress:
        while sent < total:
            due = min(total, int((time.monotonic() - started) * c.latency_rate) + 1)
            if due <= sent:
                time.sleep(0.002)
                continue
            k = min(due - sent, 10)
            send_batch(bench.sqs, url, [stamped_body(sent + i, c.body_size) for i in range(k)])
            sent += k
            progress.update(k)
    return sent, time.monotonic() - started


@dataclass(frozen=True, slots=True)
class LatencyWindow:
    """One contender's window of steady load: each message's send stamp -> first arrival, in us."""

    label: str
    sent: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    latencies_us: tuple[int, ...] = ()  # sorted
    error: str | None = None


def run_latency(bench: Bench, label: str, make_spec: SpecFactory) -> LatencyWindow:
    with fresh_queue(bench.sqs, _slug(f"latency-{label}")) as url:
        return _latency(bench, url, label, make_spec)


def _latency(bench: Bench, url: str, label: str, make_spec: SpecFactory) -> LatencyWindow:
    sink = bench.fast
    assert sink is not None
    sink.reset()
    try:
        spec = make_spec(url)
        with ContenderProcess(spec, bench.log_dir) as proc:
            proc.wait_ready(90)
            time.sleep(1.0)
            cpu0 = sum(proc.cpu().values())
            sent, seconds = _send_steadily(bench, url, spec.label)
            deadline = time.monotonic() + 30
            while sink.unique() < sent and time.monotonic() < deadline and proc.alive():
                time.sleep(0.05)
            cpu = sum(proc.cpu().values()) - cpu0
            proc.stop()
    except Skipped as exc:
        return LatencyWindow(label, error=str(exc))
    except Exception as exc:  # noqa: BLE001
        log.error("latency / %s failed: %s", label, _first_line(exc))
        return LatencyWindow(label, error=_first_line(exc))
    latencies = tuple(sorted(sink.latencies_us()))
    error = None if len(latencies) >= sent else f"only {len(latencies)} of {sent} arrived"
    window = LatencyWindow(spec.label, sent, seconds, cpu, latencies, error)
    log.info("latency %-26s p50 %.1f ms, p99 %.1f ms, max %.1f ms at %.0f msg/s", spec.label,
             _percentile(latencies, 0.50) / 1000, _percentile(latencies, 0.99) / 1000,
             (latencies[-1] / 1000 if latencies else 0.0), sent / seconds if seconds else 0.0)
    return window


def pooled_latency(offered_per_s: float, windows: list[LatencyWindow]) -> Latency:
    """One contender's windows as one measurement: the percentiles over every message of every
    window (not a chosen window), the sent, the time and the CPU summed; a failed window fails it."""
    label = next((w.label for w in windows if not w.error), windows[0].label)
    failed = next((w.error for w in windows if w.error), None)
    if failed and not any(w.latencies_us for w in windows):
        return Latency(label, offered_per_s, 0, 0.0, error=failed)
    latencies = sorted(us for w in windows for us in w.latencies_us)
    delivered, sent = len(latencies), sum(w.sent for w in windows)
    notes = tuple(f"p99 {_percentile(w.latencies_us, 0.99) / 1000:.1f} ms, max "
                  f"{(w.latencies_us[-1] if w.latencies_us else 0) / 1000:.1f} ms" if not w.error else w.error
                  for w in windows) if len(windows) > 1 else ()
    return Latency(
        label, offered_per_s, sent, sum(w.seconds for w in windows), delivered=delivered,
        p50_ms=_percentile(latencies, 0.50) / 1000, p99_ms=_percentile(latencies, 0.99) / 1000,
        max_ms=(latencies[-1] / 1000 if latencies else 0.0),
        cpu_us_per_msg=sum(w.cpu_seconds for w in windows) / delivered * 1e6 if delivered else 0.0,
        windows=notes, error=failed,
    )


def latency_cases(bench: Bench) -> list[Latency]:
    """mq-bridge and the poller's defaults, ``repeats`` windows each, interleaved (A B A B): a stall
    of the box (a GC pause of LocalStack's, a neighbour) lands in one window, and each contender's
    row pools all of its windows, so one stall weighs 1/repeats of what it did in a single window."""
    c = bench.config
    if bench.fast is None or "latency" not in c.scenarios:
        return []
    fast = bench.fast
    cases: list[tuple[str, SpecFactory]] = []
    if "mq-bridge" in c.contenders:
        cases.append(("mq-bridge", lambda url: bench.mq_bridge(
            mqbridge.BASIC, mqbridge.http_route(url, bench.endpoint, REGION, fast.url), "mq-latency")))
    if "poller" in c.contenders:
        cases.append(("poller defaults", lambda url: bench.poller(url, HttpTarget(fast.url))))
    windows: list[list[LatencyWindow]] = [[] for _ in cases]
    for _ in range(max(1, c.repeats)):
        for i, (label, make_spec) in enumerate(cases):
            windows[i].append(run_latency(bench, label, make_spec))
    rows = [pooled_latency(c.latency_rate, w) for w in windows]
    for row, pooled in zip(rows, windows, strict=True):
        log.info("latency %-26s p50 %.1f ms, p99 %.1f ms at %.0f msg/s, %.0f us CPU/msg (%d window(s))",
                 row.contender, row.p50_ms, row.p99_ms, row.achieved_per_s, row.cpu_us_per_msg, len(pooled))
    return rows


# --------------------------------------------------------------------------- RSS


def rss_case(bench: Bench) -> RssRun | None:
    """The poller (defaults) on a full queue into a sink that never answers: RSS of its tree every
    second for ``stall_seconds``, after ``RSS_WARMUP_S``. It is then killed, not stopped: a
    graceful stop would wait its shutdown timeout for answers that never come."""
    if bench.stall is None or not bench.config.runs("rss", "poller"):
        return None
    with fresh_queue(bench.sqs, "rss-stall") as url:
        return _rss(bench, url, bench.stall)


def _rss(bench: Bench, url: str, sink: Sink) -> RssRun:
    c = bench.config
    label = "poller defaults"
    try:
        preload(bench.sqs, url, bench.bodies[:c.stall_messages], label="stalled sink")
        spec = bench.poller(url, HttpTarget(sink.url))
        samples: list[tuple[float, int]] = []
        with ContenderProcess(spec, bench.log_dir) as proc:
            proc.wait_ready(90)
            time.sleep(RSS_WARMUP_S)
            began = time.monotonic()
            with bar(total=int(c.stall_seconds), desc="stalled sink, RSS", unit="s") as progress:
                while True:
                    elapsed = time.monotonic() - began
                    samples.append((round(elapsed, 2), proc.rss()))
                    if elapsed >= c.stall_seconds:
                        break
                    if not proc.alive():
                        raise RuntimeError(f"the poller exited with code {proc.proc.returncode}: {proc.log_tail(5)}")
                    time.sleep(min(1.0, c.stall_seconds - elapsed))
                    progress.update(min(int(time.monotonic() - began), int(c.stall_seconds)) - progress.n)
            proc.kill()
    except Exception as exc:  # noqa: BLE001
        log.error("rss / %s failed: %s", label, _first_line(exc))
        return RssRun(label, c.stall_seconds, error=_first_line(exc))
    result = RssRun(label, c.stall_seconds, tuple(samples), received_by_sink=sink.stats()["requests"])
    log.info("stalled sink: RSS %.1f MB -> %.1f MB (peak %.1f MB) over %.0f s: %s", result.start / 1e6,
             result.end / 1e6, result.peak / 1e6, c.stall_seconds, "flat" if result.flat else "NOT flat")
    return result


# --------------------------------------------------------------------------- start-up


def _start_specs(bench: Bench) -> list[tuple[str, str, SpecFactory]]:
    """(label, family, queue URL -> spec) of every contender that delivers to the fast sink."""
    c, fast = bench.config, bench.fast
    assert fast is not None
    specs: list[tuple[str, str, SpecFactory]] = []
    if "mq-bridge" in c.contenders:
        specs.append(("mq-bridge", "mq-bridge", lambda url: bench.mq_bridge(
            mqbridge.BASIC, mqbridge.http_route(url, bench.endpoint, REGION, fast.url), "mq-start")))
    if "poller" in c.contenders:
        specs.append(("poller defaults", "poller", lambda url: bench.poller(url, HttpTarget(fast.url))))
    for kind in ("naive", "good"):
        if kind in c.contenders:
            specs.append((LOOP_LABELS[kind], kind, lambda url, kind=kind: loop_spec(
                kind, bench.endpoint, url, sink=fast.url, threads=c.threads)))
    return specs


def start_cases(bench: Bench) -> list[StartRun]:
    """Exec -> first event at the fast sink, and the tree's CPU by then, for every contender: one
    warm-up round, then ``start_runs`` rounds, the contenders interleaved within each round (so
    that the box's drift falls on all of them alike), each run on a fresh queue of one message."""
    c = bench.config
    if bench.fast is None or "start" not in c.scenarios:
        return []
    specs = _start_specs(bench)
    samples: dict[str, list[StartSample]] = {label: [] for label, _f, _m in specs}
    errors: dict[str, str] = {}
    rounds = 1 + c.start_runs
    with bar(total=rounds * len(specs), desc="start-up", unit="run") as progress:
        for round_ in range(rounds):
            for label, _family, make_spec in specs:
                progress.update(1)
                if label in errors:
                    continue
                try:
                    with fresh_queue(bench.sqs, _slug(f"start-{label}")) as url:
                        sample = first_event(make_spec(url), sqs=bench.sqs, queue_url=url, sink=bench.fast,
                                             log_dir=bench.log_dir, body_size=c.body_size)
                except Skipped as exc:
                    errors[label] = str(exc)
                    continue
                except Exception as exc:  # noqa: BLE001 - the row says why; the run goes on
                    log.error("start / %s failed: %s", label, _first_line(exc))
                    errors[label] = _first_line(exc)
                    continue
                if round_:  # round 0 is the warm-up
                    samples[label].append(sample)
    out = []
    for label, family, _make in specs:
        got = samples[label]
        row = StartRun(label, family, tuple(s.first_event_s for s in got), tuple(s.cpu_s for s in got),
                       error=errors.get(label))
        if row.ok:
            log.info("start %-18s first event %.2f s (%.2f-%.2f), tree CPU %.2f s (%.2f-%.2f) by then", label,
                     row.first_event_median, min(row.first_event_s), max(row.first_event_s), row.cpu_median,
                     min(row.cpu_s), max(row.cpu_s))
        out.append(row)
    return out
