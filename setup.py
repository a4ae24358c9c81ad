"""Compiles the worker's hot path with mypyc (the rest of setup is pyproject.toml).

Delivering a message runs through these modules on every receive, event, POST and delete. Compiled,
a worker spent ~20% less CPU per message into an HTTP sink and ~10% into Kafka (interleaved drains
of 20,000 messages from LocalStack, one worker). The sources stay plain Python: without mypy's
mypyc, a C compiler or Python's headers, or with SQS_POLLER_PURE_PYTHON=1, the same modules install
and run uncompiled.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sysconfig

from setuptools import setup

# The modules a message passes through, and nothing that only runs at start or in the supervisor.
# In these modules `@mypyc_attr(native_class=False)` keeps a class plain Python where mypyc cannot
# have it native: OSError subclasses, classes that extend a Python class (channels.base's, which
# plugins extend), and frozen dataclasses that are pickled. A seam a test replaces is an instance
# attribute: compiled code does not see a method replaced on an instance.
HOT_MODULES = [
    "channels/envelopes.py",
    "channels/events.py",
    "channels/http.py",
    "channels/kafka/channel.py",
    "channels/kafka/progress.py",
    "channels/kafka/records.py",
    "channels/reports.py",
    "channels/tracing.py",
    "channels/transport/http.py",
    "poller/acker.py",
    "poller/backoff.py",
    "poller/circuit.py",
    "poller/deleter.py",
    "poller/dispatcher.py",
    "poller/gate.py",
    "poller/ledger.py",
    "poller/receiver.py",
    "poller/sqs.py",
    "poller/stats.py",
]


def _why_pure() -> str | None:
    """Why the modules stay pure Python here, or None: they can be compiled."""
    if os.environ.get("SQS_POLLER_PURE_PYTHON") == "1":
        return "SQS_POLLER_PURE_PYTHON=1"
    if importlib.util.find_spec("mypyc") is None:
        return "mypyc is not installed"
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    if shutil.which(cc.split()[0]) is None:
        return "no C compiler"
    if not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
        return "no Python headers (python3-dev)"
    return None


def _ext_modules() -> list[object]:
    reason = _why_pure()
    if reason is not None:
        print(f"setup.py: {reason}; the hot path stays pure Python")
        return []
    from mypyc.build import mypycify

    # The shared library inside the poller package: an editable install puts the packages, not the
    # project root, on the import path. mypyc type-checks what it compiles (pyproject.toml's strict
    # mypy): the modules it only reads types from are `make lint`'s to check, not the build's (a
    # wheel's build environment has the build requirements, not every dependency).
    return list(mypycify(["--follow-imports=silent", *HOT_MODULES], opt_level="3", group_name="poller._hotpath"))


setup(ext_modules=_ext_modules())
