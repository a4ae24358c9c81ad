"""Processes from ``/proc`` (Linux): CPU (utime + stime), RSS, the tree below a pid, a port's owner."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "CLK_TCK",
    "children",
    "cmdline",
    "cpu_seconds",
    "descendants",
    "is_stopped",
    "listener_pid",
    "process_cpu",
    "rss_bytes",
    "thread_cpu_seconds",
    "total_cpu",
    "tree",
    "tree_rss",
]

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat_fields(pid: int, path: str | None = None) -> list[str] | None:
    try:
        text = Path(path or f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    return text[text.rindex(")") + 2:].split()


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), in seconds; 0.0 if it is gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # After the name: field 3 (state) is index 0, so utime (14) is 11 and stime (15) is 12.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def thread_cpu_seconds(tid: int) -> float | None:
    """utime + stime of one thread of this process, in seconds; None if it is gone."""
    fields = _stat_fields(tid, f"/proc/self/task/{tid}/stat")
    return None if fields is None else (int(fields[11]) + int(fields[12])) / CLK_TCK


def is_stopped(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] in ("T", "t")


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            out += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:
            continue
    return out


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, grandchildren, ...)."""
    found: list[int] = []
    stack = children(pid)
    while stack:
        child = stack.pop()
        found.append(child)
        stack += children(child)
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def process_cpu(pids: Iterable[int]) -> dict[int, float]:
    return {pid: cpu_seconds(pid) for pid in pids}


def total_cpu(root: int) -> float:
    """CPU seconds of ``root`` and all its descendants alive now."""
    return sum(process_cpu([root, *descendants(root)]).values())


def tree(root: int) -> list[int]:
    return [root, *descendants(root)]


def rss_bytes(pid: int) -> int:
    """Resident set of one process (``/proc/<pid>/statm``); 0 if it is gone."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def tree_rss(root: int) -> int:
    """RSS summed over ``root`` and its descendants (shared pages counted in each: an upper bound)."""
    return sum(rss_bytes(pid) for pid in tree(root))


def listener_pid(port: int) -> int | None:
    """The pid holding a listening TCP socket on ``port`` (an external LocalStack's), if visible."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # local_address is HEX_IP:HEX_PORT; state 0A is LISTEN
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd) in inodes:
                    return int(entry.name)
        except OSError:
            continue
    return None
