"""PNG plots of a run (matplotlib, no display): throughput and CPU per message per contender,
throughput against in-flight on the 20 ms sink, RSS under a stalled sink, start-up."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display here or in CI

import matplotlib.pyplot as plt

from benchmarks.model import CEILING, SLOW, RssRun, StartRun, Throughput
from benchmarks.report import SCENARIO_ORDER
from benchmarks.targets import find

__all__ = ["plot_all"]

log = logging.getLogger(__name__)

COLORS = {"poller": "#1f77b4", "mq-bridge": "#ff7f0e", "ceiling": "#7f7f7f", "naive": "#d62728", "good": "#2ca02c"}


def plot_throughput_cpu(rows: Sequence[Throughput], path: Path, title: str) -> None:
    good = [r for r in rows if r.ok]
    good.sort(key=lambda r: (SCENARIO_ORDER.index(r.scenario) if r.scenario in SCENARIO_ORDER else 99))
    if not good:
        return
    labels = [f"{r.scenario}: {r.contender}" for r in good]
    colors = [COLORS.get(r.family, "#9467bd") for r in good]
    y = range(len(good))
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 0.45 * len(good) + 1.8), sharey=True)
    left.barh(y, [r.msg_per_s for r in good], color=colors)
    right.barh(y, [r.cpu_us_per_msg for r in good], color=colors)
    left.set_yticks(list(y), labels)
    left.invert_yaxis()
    left.set_xlabel("messages / s (higher is better)")
    right.set_xlabel("CPU us / message, whole process tree (lower is better)")
    for ax, values in ((left, [r.msg_per_s for r in good]), (right, [r.cpu_us_per_msg for r in good])):
        ax.grid(axis="x", alpha=0.3)
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:,.0f}", va="center", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_inflight(sweep: Sequence[Throughput], rows: Sequence[Throughput], delay_ms: float, path: Path) -> None:
    points = sorted((int(r.details.get("concurrency", 0)), r) for r in sweep if r.ok)
    if not points:
        return
    xs = [n for n, _ in points]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(xs, [r.msg_per_s for _, r in points], "o-", color=COLORS["poller"], label="poller, 1 process")
    ax.plot(xs, [n / (delay_ms / 1000) for n in xs], ":", color="black", label=f"bound: n / {delay_ms:g} ms")
    for row, style, text in ((find(rows, SLOW, "mq-bridge"), "--", "mq-bridge defaults (20 ms sink)"),
                             (find(rows, CEILING, "ceiling"), "-.", "boto3 ceiling (no channel)")):
        if row is not None:
            ax.axhline(row.msg_per_s, linestyle=style, color=COLORS.get(row.family, "grey"), label=text)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(n) for n in xs])
    top = max(r.msg_per_s for _, r in points)
    ax.set_ylim(0, top * 1.6)
    ax.set_xlabel("--http-concurrency (requests in flight per process)")
    ax.set_ylabel("messages / s")
    ax.set_title(f"Throughput against in-flight, sink answering in {delay_ms:g} ms")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_rss(rss: RssRun, path: Path) -> None:
    if not rss.samples:
        return
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot([t for t, _ in rss.samples], [b / 1e6 for _, b in rss.samples], color=COLORS["poller"],
            label=rss.contender)
    ax.axhspan(rss.start * 0.9 / 1e6, rss.start * 1.1 / 1e6, color="green", alpha=0.1, label="start +-10%")
    ax.set_ylim(0, max(b for _, b in rss.samples) / 1e6 * 1.3)
    ax.set_xlabel("seconds of a stalled sink")
    ax.set_ylabel("RSS of the process tree, MB")
    ax.set_title("RSS while the sink never answers")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_startup(start: Sequence[StartRun], path: Path) -> None:
    """Median time to the first event and tree CPU by then, per contender, with each run as a dot."""
    good = [r for r in start if r.ok]
    if not good:
        return
    y = range(len(good))
    colors = [COLORS.get(r.family, "#9467bd") for r in good]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.5 * len(good) + 1.8), sharey=True)
    for ax, runs, median in ((left, lambda r: r.first_event_s, lambda r: r.first_event_median),
                             (right, lambda r: r.cpu_s, lambda r: r.cpu_median)):
        ax.barh(y, [median(r) for r in good], color=colors, alpha=0.6)
        for i, r in enumerate(good):
            ax.plot(runs(r), [i] * len(runs(r)), "k.", markersize=4)
            ax.text(median(r), i, f" {median(r):.2f}", va="center", fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    left.set_yticks(list(y), [r.contender for r in good])
    left.invert_yaxis()
    left.set_xlabel("exec -> first event at the sink, s (bar: median, dots: runs)")
    right.set_xlabel("CPU of the whole process tree by then, s")
    fig.suptitle("Start-up (fast sink, one message waiting)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_all(out_dir: Path, rows: Sequence[Throughput], sweep: Sequence[Throughput], rss: RssRun | None,
             delay_ms: float, title: str, *, start: Sequence[StartRun] = ()) -> list[str]:
    """Writes the plots that have data; returns their file names."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    jobs = [("throughput_cpu.png", lambda p: plot_throughput_cpu(rows, p, title)),
            ("inflight.png", lambda p: plot_inflight(sweep, rows, delay_ms, p))]
    if rss is not None:
        jobs.append(("rss_stalled_sink.png", lambda p: plot_rss(rss, p)))
    if start:
        jobs.append(("startup.png", lambda p: plot_startup(start, p)))
    for name, job in jobs:
        path = out_dir / name
        path.unlink(missing_ok=True)
        try:
            job(path)
        except Exception:
            log.exception("plot %s failed", name)
        if path.exists():
            written.append(name)
    return written
