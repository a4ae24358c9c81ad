"""Start-up probe: exec ``poller run`` against a running SQS endpoint and time exec -> first event
at a local dumper, with the CPU of the poller's whole process tree (``/proc``) by then.

    python -m benchmarks.start_probe --endpoint http://127.0.0.1:4566 --runs 5 --processes 2 [-- extra run flags]

Each run gets a fresh queue with one message (a killed run's long polls would hide the next
run's message), and the tree is killed after the event. The first run is a warm-up.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time

import boto3

from benchmarks.procstat import cpu_seconds, tree
from poller.kit.dumper import DumperServer

log = logging.getLogger("start_probe")


def one_run(sqs: object, dumper: DumperServer, env: dict[str, str], name: str, processes: int,
            extra: list[str], command: list[str], cwd: str | None) -> tuple[float, float]:
    url = sqs.create_queue(QueueName=name)["QueueUrl"]  # type: ignore[attr-defined]
    sqs.send_message(QueueUrl=url, MessageBody='{"n": 1}')  # type: ignore[attr-defined]
    seen = len(dumper.events)
    started = time.monotonic()
    process = subprocess.Popen([*command, "run", "--queue-url", url, "--sink", dumper.url, "--processes",
                                str(processes), *extra], env=env, cwd=cwd, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cpu: dict[int, float] = {}  # last reading per pid: a process that ended keeps its last figure
    while len(dumper.events) <= seen and time.monotonic() - started < 20:
        for pid in tree(process.pid):
            cpu[pid] = cpu_seconds(pid)
        time.sleep(0.002)
    wall = time.monotonic() - started
    for pid in tree(process.pid):
        cpu[pid] = cpu_seconds(pid)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(30)
    return wall, sum(cpu.values())


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser()
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--source", help="run the poller from this checkout (python -m poller with it on "
                                         "PYTHONPATH) instead of the installed console script")
    parser.add_argument("extra", nargs="*")
    args = parser.parse_args()
    env = dict(os.environ, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_REGION="us-east-1",
               AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL_SQS=args.endpoint)
    if args.source:  # run from there: -m puts the working directory first on sys.path
        command = [sys.executable, "-m", "poller"]
        env["PYTHONPATH"] = os.path.abspath(args.source)
    else:  # the console script next to this interpreter (a venv's), else the one on PATH
        beside = os.path.join(os.path.dirname(sys.executable), "poller")
        command = [beside if os.access(beside, os.X_OK) else shutil.which("poller") or "poller"]
    sqs = boto3.client("sqs", endpoint_url=args.endpoint, region_name="us-east-1",
                       aws_access_key_id="test", aws_secret_access_key="test")
    dumper = DumperServer(out=io.StringIO(), keep=True)
    threading.Thread(target=dumper.serve_forever, daemon=True).start()
    walls, cpus = [], []
    for i in range(args.runs + 1):
        wall, cpu = one_run(sqs, dumper, env, f"startprobe-{os.getpid()}-{i}", args.processes,
                            args.extra, command, args.source)
        if i:  # the first is a warm-up
            walls.append(wall)
            cpus.append(cpu)
            log.info("run %d: first event %.3f s, tree CPU %.3f s", i, wall, cpu)
    log.info("median: first event %.3f s (%.3f-%.3f), tree CPU %.3f s (%.3f-%.3f)",
             statistics.median(walls), min(walls), max(walls), statistics.median(cpus), min(cpus), max(cpus))
    return 0


if __name__ == "__main__":
    sys.exit(main())
