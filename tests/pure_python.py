"""``pytest -p pure_python`` (with tests/ on PYTHONPATH): the project's modules are imported from
their sources even where a mypyc build of them sits next to them (setup.py), as on an install
without a C compiler. A plugin, not part of support.py: it must act before anything imports
``poller`` or ``channels``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib.abc import PathEntryFinder
from importlib.machinery import BYTECODE_SUFFIXES, SOURCE_SUFFIXES, FileFinder, SourceFileLoader, SourcelessFileLoader
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent
_PACKAGES = tuple(str(_REPO / name) for name in ("poller", "channels"))
_sources_only: Callable[[str], PathEntryFinder] = FileFinder.path_hook(
    (SourceFileLoader, SOURCE_SUFFIXES), (SourcelessFileLoader, BYTECODE_SUFFIXES))


def _hook(path: str) -> PathEntryFinder:
    if not path.startswith(_PACKAGES):
        raise ImportError(path)  # the next hook (the usual FileFinder) takes it
    return _sources_only(path)


if any(name == "poller" or name.startswith(("poller.", "channels")) for name in sys.modules):
    raise RuntimeError("pure_python: the project's modules were imported before the plugin")
sys.path_hooks.insert(0, _hook)
sys.path_importer_cache.clear()
