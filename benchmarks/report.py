"""The run's report: ``report.md`` (tables, ratios in the same run, targets, plots), the JSON of
every detail, and the short table printed at the end."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import platform
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from benchmarks.config import SuiteConfig
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
from benchmarks.targets import Outcome, evaluate, find, poller_default

__all__ = ["RunReport", "format_text", "git_commit", "machine_summary", "render_markdown", "write_json"]

log = logging.getLogger(__name__)

SCENARIO_ORDER = (CEILING, FAST, SLOW, KAFKA, REMOTE)
PEER_NAMES = ("localstack", "sink", "tansu", "proxy")


@dataclass(frozen=True, slots=True)
class RunReport:
    config: SuiteConfig
    started: dt.datetime
    seconds: float
    sqs: str                                   # where SQS came from (LocalStack started here, or external)
    rows: tuple[Throughput, ...]
    sweep: tuple[Throughput, ...] = ()
    latency: tuple[Latency, ...] = ()
    rss: RssRun | None = None
    start: tuple[StartRun, ...] = ()
    plots: tuple[str, ...] = ()                # file names next to report.md
    log_dir: str = ""
    machine: str = ""                          # CPU model, cores, memory, load
    commit: str = ""                           # the poller's git commit (and whether the tree was dirty)
    notes: tuple[str, ...] = field(default_factory=tuple)

    def outcomes(self) -> list[Outcome]:
        return evaluate(self.rows, self.rss, latency=self.latency, start=self.start)


# --------------------------------------------------------------------------- context


def machine_summary() -> str:
    """CPU model, cores, memory and load average: what the absolute figures were measured on."""
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split("MemTotal:", 1)[1].split()[0])
        memory = f", {kib / 2**20:.0f} GiB"
    one, five, fifteen = os.getloadavg()
    load = f", load average {one:.2f} {five:.2f} {fifteen:.2f} at the start"
    return f"{platform.system()} {platform.machine()}, {model}, {os.cpu_count()} CPUs{memory}{load}"


def git_commit(root: Path) -> str:
    """``HEAD``'s short hash and subject, and whether the code measured (poller/, channels/) differs from it."""
    try:
        head = subprocess.run(["git", "-C", str(root), "log", "-1", "--format=%h %s"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "poller", "channels"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    hash_, _, subject = head.partition(" ")
    subject = subject if len(subject) <= 70 else subject[:67] + "..."
    return f"`{hash_}` ({subject})" + (" + uncommitted changes in poller/ or channels/" if dirty else "")


# --------------------------------------------------------------------------- ratios


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _pair(row: Throughput, ref: Throughput | None) -> str:
    """``rate ratio / CPU ratio`` of ``row`` against ``ref`` (both of this run)."""
    if ref is None or not row.ok or ref is row:
        return "-"
    rate = row.msg_per_s / ref.msg_per_s if ref.msg_per_s else None
    cpu = row.cpu_us_per_msg / ref.cpu_us_per_msg if ref.cpu_us_per_msg else None
    return f"{_x(rate)} / {_x(cpu)}"


def _share(row: Throughput, name: str) -> str:
    share = row.peer_share(name)
    return "-" if share is None else f"{share * 100:.0f}%"


def _peers(row: Throughput) -> str:
    parts = [f"{name} {_share(row, name)}" for name in PEER_NAMES[1:] if name in row.peer_cpu_seconds]
    return ", ".join(parts) or "-"


def _notes(row: Throughput) -> str:
    if row.error:
        return row.error if row.error.startswith("skipped") else f"**failed**: {row.error}"
    d = row.details
    notes = [f"{d['duplicates']} duplicates"] if d.get("duplicates") else []
    if row.family == "poller" and d.get("workers_seen"):
        low, high = d["workers_seen"]
        notes.append(f"{low} worker(s)" if low == high else f"{low}-{high} workers")
    notes += list(d.get("notes", ()))
    if d.get("startup_cpu_seconds") is not None:
        notes.append(f"start-up {d['startup_cpu_seconds']:.2f} s CPU (not counted)")
    return "; ".join(notes)


def _ordered(rows: Sequence[Throughput]) -> list[Throughput]:
    return sorted(rows, key=lambda r: SCENARIO_ORDER.index(r.scenario) if r.scenario in SCENARIO_ORDER else 99)


def _md_table(header: Sequence[str], lines: Sequence[Sequence[str]], align: str) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(out)


def _fmt_rate(row: Throughput) -> str:
    return f"{row.msg_per_s:,.0f}" if row.ok else "-"


def _fmt_cpu(row: Throughput) -> str:
    return f"{row.cpu_us_per_msg:,.1f}" if row.ok else "-"


def throughput_table(rows: Sequence[Throughput]) -> str:
    ceiling = find(rows, CEILING, "ceiling")
    naive, good = find(rows, FAST, "naive"), find(rows, FAST, "good")
    lines = []
    for r in _ordered(rows):
        mq = find(rows, r.scenario, "mq-bridge")
        same_sink = r.scenario == FAST
        lines.append([
            r.scenario, r.contender, f"{r.messages:,}", _fmt_rate(r), _fmt_cpu(r),
            _pair(r, mq), _pair(r, ceiling), _pair(r, naive) if same_sink else "-",
            _pair(r, good) if same_sink else "-", _share(r, "localstack"), _peers(r), _notes(r),
        ])
    return _md_table(["scenario", "contender", "messages", "msg/s", "CPU us/msg", "vs mq-bridge",
                      "vs boto3 ceiling", "vs naive loop", "vs good loop", "LocalStack CPU", "peers' CPU", "notes"],
                     lines, "llrrrrrrrrll")


def remote_table(rows: Sequence[Throughput]) -> str:
    lines = []
    for family, label in (("poller", "poller defaults"), ("mq-bridge", "mq-bridge")):
        direct = poller_default(rows, FAST) if family == "poller" else find(rows, FAST, family)
        remote = poller_default(rows, REMOTE) if family == "poller" else find(rows, REMOTE, family)
        if direct is None and remote is None:
            continue
        ratio = (f"{remote.msg_per_s / direct.msg_per_s:.2f}" if direct and remote and direct.msg_per_s else "-")
        lines.append([label, _fmt_rate(direct) if direct else "-", _fmt_rate(remote) if remote else "-", ratio])
    return _md_table(["contender", "direct msg/s", "SQS +20 ms msg/s", "ratio to direct"], lines, "lrrr")


def latency_table(rows: Sequence[Latency]) -> str:
    lines = [[r.contender, f"{r.offered_per_s:,.0f}", f"{r.achieved_per_s:,.0f}", f"{r.delivered:,} / {r.sent:,}",
              f"{r.p50_ms:.1f}", f"{r.p99_ms:.1f}", f"{r.max_ms:.1f}", f"{r.cpu_us_per_msg:,.0f}",
              (r.error if r.error.startswith("skipped") else f"**failed**: {r.error}") if r.error
              else _windows_note(r.windows)]
             for r in rows]
    return _md_table(["contender", "offered msg/s", "sent msg/s", "arrived / sent", "p50 ms", "p99 ms", "max ms",
                      "CPU us/msg", "notes"], lines, "lrrrrrrrl")


def _windows_note(windows: Sequence[str]) -> str:
    return f"{len(windows)} windows pooled: {'; '.join(windows)}" if windows else ""


def rss_table(rss: RssRun) -> str:
    if rss.error:
        return f"{rss.contender}: **failed**: {rss.error}"
    change = (rss.end - rss.start) / rss.start if rss.start else 0.0
    line = [rss.contender, f"{rss.seconds:.0f}", f"{rss.start / 1e6:.1f}", f"{rss.end / 1e6:.1f}",
            f"{change:+.1%}", f"{rss.peak / 1e6:.1f}", "yes" if rss.flat else "**no**", f"{rss.received_by_sink:,}"]
    return _md_table(["contender", "seconds", "start MB", "end MB", "change", "peak MB", "within 10%",
                      "requests the sink took"], [line], "lrrrrrlr")


def sweep_table(sweep: Sequence[Throughput], delay_ms: float) -> str:
    lines = []
    for r in sweep:
        n = int(r.details.get("concurrency", 0))
        bound = n / (delay_ms / 1000) if delay_ms else 0
        lines.append([str(n), _fmt_rate(r), _fmt_cpu(r), f"{bound:,.0f}",
                      f"{r.msg_per_s / bound:.0%}" if r.ok and bound else "-", _notes(r)])
    return _md_table(["--http-concurrency", "msg/s", "CPU us/msg", "bound n / 20 ms", "of the bound", "notes"],
                     lines, "rrrrrl")


def start_table(start: Sequence[StartRun]) -> str:
    mq = next((r for r in start if r.family == "mq-bridge" and r.ok), None)
    lines = []
    for r in start:
        if not r.ok:
            note = r.error or "no run"
            lines.append([r.contender, "0", "-", "-", "-", "-", "-",
                          note if note.startswith("skipped") else f"**failed**: {note}"])
            continue
        vs = (f"{r.first_event_median / mq.first_event_median:.2f}x / {r.cpu_median / mq.cpu_median:.2f}x"
              if mq is not None and r is not mq and mq.first_event_median and mq.cpu_median else "-")
        lines.append([r.contender, str(len(r.first_event_s)), f"{r.first_event_median:.2f}",
                      f"{min(r.first_event_s):.2f}-{max(r.first_event_s):.2f}", f"{r.cpu_median:.2f}",
                      f"{min(r.cpu_s):.2f}-{max(r.cpu_s):.2f}", vs, ""])
    return _md_table(["contender", "runs", "first event s (median)", "range", "tree CPU s by then (median)",
                      "range", "vs mq-bridge", "notes"], lines, "lrrrrrrl")


def targets_table(outcomes: Sequence[Outcome]) -> str:
    mark = {True: "PASS", False: "**FAIL**", None: "not measured"}
    return _md_table(["target", "measured (poller defaults, same run)", "result"],
                     [[o.target, o.measured, mark[o.met]] for o in outcomes], "lll")


# --------------------------------------------------------------------------- documents


def render_markdown(report: RunReport, *, image_prefix: str = "") -> str:
    c = report.config
    kind = "quick" if c.quick else "full"
    head = [
        f"# Benchmark: sqs-poller against mq-bridge and boto3 ({kind} run)",
        "",
        f"- date: {report.started:%Y-%m-%d %H:%M} UTC, {report.seconds / 60:.1f} minutes "
        f"(`python -m benchmarks.run{' --quick' if c.quick else ''}`, see benchmarks/README.md)",
        f"- machine: {report.machine or f'{os.cpu_count()} CPUs'}; Python {platform.python_version()}",
        f"- commit: {report.commit or 'unknown'}",
        f"- SQS: {report.sqs}",
        "",
        f"Each throughput case: a fresh queue pre-loaded with the same {c.body_size}-byte bodies "
        f"({c.messages:,} per case; {c.slow_messages:,} on the 20 ms sink, {c.naive_messages:,} for the naive "
        "loop), drained by one contender. msg/s and CPU are measured in the same window for all (start-up "
        "and pre-loading excluded); CPU is utime + stime of the contender's whole process tree, per message. "
        "`a / b` columns are msg/s ratio / CPU-per-message ratio against that row of **this** run (same "
        "LocalStack, same sink, same minutes): read those, not the absolute numbers, on a shared 2-core box. "
        "Peers' CPU (LocalStack, sink, tansu, proxy) is a share of one core over the window, never added to "
        "a contender.",
        "",
        "## Targets (issue 16)",
        "",
        targets_table(report.outcomes()),
        "",
        "## Throughput and CPU per message",
        "",
        throughput_table(report.rows),
        "",
    ]
    body: list[str] = []
    if report.start:
        body += ["## Start-up: exec to the first event (fast sink)", "",
                 f"Each run: a fresh queue holding one message, the contender exec'd, the time until its event "
                 f"reached the sink (the sink's arrival time) and the CPU of its whole process tree by then; "
                 f"then it is killed. One warm-up run each, not counted, then {c.start_runs} rounds with the "
                 f"contenders interleaved. `vs mq-bridge`: time ratio / CPU ratio of the medians.", "",
                 start_table(report.start), ""]
    if any(r.scenario == REMOTE for r in report.rows):
        body += [f"## SQS {c.sqs_rtt_ms:g} ms away (delay proxy in front of LocalStack)", "",
                 remote_table(report.rows), ""]
    if report.latency:
        rounds = (f"{c.repeats} windows of {c.latency_seconds:.0f} s each, the contenders interleaved"
                  if c.repeats > 1 else f"{c.latency_seconds:.0f} s")
        body += [f"## Latency at a steady {c.latency_rate:,.0f} msg/s for {rounds} (fast sink)", "",
                 "Send stamp (in the body, wall clock before SendMessageBatch) to the first arrival at the sink. "
                 "With several windows, each contender's percentiles are over all of its messages (the windows "
                 "pooled, none chosen); the notes give each window's own p99 and max.", "",
                 latency_table(report.latency), ""]
    if report.rss is not None:
        body += [f"## RSS with a stalled sink ({c.stall_seconds:.0f} s, queue of {c.stall_messages:,})", "",
                 "The sink accepts connections and never answers. RSS of the poller's process tree (supervisor + "
                 "workers) each second from 2 s after it is ready.", "", rss_table(report.rss), ""]
    if report.sweep:
        body += ["## Throughput against in-flight (20 ms sink, `--processes 1`)", "",
                 "Only `--http-concurrency` changes; the bound is what that many requests in flight can carry "
                 "at 20 ms each (the poller's `--max-in-flight`, 200 messages per process by default, bounds "
                 "it too).", "", sweep_table(report.sweep, c.sink_delay_ms), ""]
    if report.plots:
        body += ["## Plots", ""] + [f"![{Path(p).stem}]({image_prefix}{p})" for p in report.plots] + [""]
    notes = list(report.notes)
    failed = [r for r in [*report.rows, *report.sweep, *report.latency]
              if r.error and not r.error.startswith("skipped")]
    if failed:
        notes.append(f"{len(failed)} case(s) failed; their logs are in {report.log_dir}")
    if notes:
        body += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(head + body)


def format_text(report: RunReport) -> str:
    """The short table printed at the end of a run."""
    lines = [f"{'scenario':<22} {'contender':<26} {'msg/s':>8} {'CPU us/msg':>10} {'vs mq-bridge':>16} "
             f"{'vs ceiling':>16}"]
    ceiling = find(report.rows, CEILING, "ceiling")
    for r in _ordered(report.rows) + list(report.sweep):
        mq = find(report.rows, r.scenario if r.scenario != INFLIGHT else SLOW, "mq-bridge")
        rate = ("SKIPPED" if r.error.startswith("skipped") else "FAILED") if r.error else _fmt_rate(r)
        lines.append(f"{r.scenario:<22} {r.contender:<26} {rate:>8} {_fmt_cpu(r):>10} {_pair(r, mq):>16} "
                     f"{_pair(r, ceiling):>16}")
    for st in report.start:
        if st.ok:
            lines.append(f"start {st.contender:<28} first event {st.first_event_median:.2f} s, "
                         f"tree CPU {st.cpu_median:.2f} s (medians of {len(st.first_event_s)})")
    for lat in report.latency:
        lines.append(f"latency {lat.contender:<26} p50 {lat.p50_ms:.1f} ms, p99 {lat.p99_ms:.1f} ms "
                     f"at {lat.achieved_per_s:,.0f} msg/s")
    lines.append("")
    mark = {True: "PASS", False: "FAIL", None: "not measured"}
    lines += [f"[{mark[o.met]:>12}] {o.target}: {o.measured}" for o in report.outcomes()]
    return "\n".join(lines)


def write_json(path: Path, report: RunReport) -> None:
    doc: dict[str, Any] = {
        "date": report.started.isoformat(timespec="seconds"),
        "seconds": round(report.seconds, 1),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(report.config).items()},
        "sqs": report.sqs,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "throughput": [r.as_json() for r in report.rows],
        "inflight": [r.as_json() for r in report.sweep],
        "latency": [r.as_json() for r in report.latency],
        "rss": report.rss.as_json() if report.rss else None,
        "start": [r.as_json() for r in report.start],
        "targets": [asdict(o) for o in report.outcomes()],
        "log_dir": report.log_dir,
        "machine": report.machine,
        "commit": report.commit,
        "notes": list(report.notes),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
