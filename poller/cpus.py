"""How many worker processes fit this container (its CPU quota, else the CPUs it may use), and
how much CPU is idle (for ``--processes auto``: an added worker needs a CPU to run on).

``os.cpu_count()`` is the node's core count: a sidecar limited to 500m on a 64-core node would
start 64 workers (~45 MB each) and be OOM-killed. The quota (cgroup v2 ``cpu.max``, v1
``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``) and the CPU affinity are what the container really
gets; the quota is rounded up, and there is always at least one worker.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["container_cpu_seconds", "cpu_quota", "default_processes", "idle_cpu_seconds"]

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100  # /proc/stat's unit: 1/USER_HZ s


def default_processes(cgroup_root: Path = Path("/sys/fs/cgroup")) -> tuple[int, str]:
    """(worker processes, why) for this container."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cpu_quota(cgroup_root)
    if quota is not None and math.ceil(quota) < usable:
        n = max(1, math.ceil(quota))
        return n, f"the container's CPU quota is {quota:g} CPU(s), rounded up"
    return max(1, usable), f"{usable} CPU(s) usable by this process"


def idle_cpu_seconds(stat: Path = Path("/proc/stat")) -> float | None:
    """Seconds the machine's CPUs have been idle since boot, in all (idle + iowait of /proc/stat's
    first line), or None where there is no /proc. In a container it is the node's: the quota
    (``container_cpu_seconds``) bounds what this container may take of it."""
    line = _read(stat).partition("\n")[0].split()
    if len(line) < 6 or line[0] != "cpu":
        return None
    try:
        return (int(line[4]) + int(line[5])) / _TICKS
    except ValueError:
        return None


def container_cpu_seconds(cgroup_root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """Seconds of CPU this container's cgroup used, in all (v2 ``cpu.stat``'s usage_usec, v1
    ``cpuacct.usage``), or None where unknown."""
    for line in _read(cgroup_root / "cpu.stat").splitlines():
        if line.startswith("usage_usec "):
            return int(line.split()[1]) / 1_000_000
    v1 = _read(cgroup_root / "cpuacct" / "cpuacct.usage") or _read(cgroup_root / "cpu,cpuacct" / "cpuacct.usage")
    return int(v1) / 1_000_000_000 if v1.isdigit() else None


def cpu_quota(cgroup_root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs the cgroup may use per period, or None when unlimited or unknown."""
    v2 = _read(cgroup_root / "cpu.max")  # "max 100000" or "50000 100000"
    if v2:
        quota, _, period = v2.partition(" ")
        if quota == "max":
            return None
        return _ratio(quota, period)
    quota = (_read(cgroup_root / "cpu" / "cpu.cfs_quota_us")
             or _read(cgroup_root / "cpu,cpuacct" / "cpu.cfs_quota_us"))
    period = (_read(cgroup_root / "cpu" / "cpu.cfs_period_us")
              or _read(cgroup_root / "cpu,cpuacct" / "cpu.cfs_period_us"))
    if quota and period and quota.strip() != "-1":
        return _ratio(quota, period)
    return None


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""
