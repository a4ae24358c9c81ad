"""The hot path (setup.py's HOT_MODULES) runs compiled with mypyc where it was built, and the same
sources pass their unit tests uncompiled: the install without a C compiler."""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import subprocess
import sys

import pytest

from support import HOT_MODULE_NAMES, HOT_MODULES, REPO

# Unit tests of the compiled modules' behaviour, run again from the sources (no services).
_UNIT_TESTS = ("test_worker_unit.py", "test_visibility.py", "test_events.py", "test_envelopes.py", "test_transport.py",
               "test_sqs_errors.py", "test_sqs_signing.py", "test_kafka_unit.py", "test_circuit.py", "test_backoff.py",
               "test_loop_reports.py")


def _built() -> list[str]:
    return [path for path in HOT_MODULES if list((REPO / path).parent.glob(f"{(REPO / path).stem}.*.so"))]


@pytest.mark.skipif("pure_python" in sys.modules, reason="this run imports the sources (-p pure_python)")
@pytest.mark.skipif(not _built(), reason="not compiled: setup.py found no mypyc or no C compiler (make compile)")
def test_every_hot_module_is_imported_compiled() -> None:
    assert _built() == list(HOT_MODULES), "a partial build: run `make compile`"
    for name in HOT_MODULE_NAMES:
        module = importlib.import_module(name)
        assert isinstance(module.__loader__, importlib.machinery.ExtensionFileLoader), module.__file__


@pytest.mark.slow
def test_the_unit_tests_of_the_hot_path_pass_from_the_sources() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    check = ("import sys, importlib, importlib.machinery as m; from support import HOT_MODULE_NAMES; "
             "bad = [n for n in HOT_MODULE_NAMES "
             "if not isinstance(importlib.import_module(n).__loader__, m.SourceFileLoader)]; "
             "sys.exit(f'imported compiled: {bad}' if bad else 0)")
    probe = subprocess.run([sys.executable, "-c", f"import pure_python; {check}"], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "pure_python", "-p", "no:cacheprovider", "-p", "no:xdist",
         "-m", "not integration and not slow", *(f"tests/{name}" for name in _UNIT_TESTS)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
