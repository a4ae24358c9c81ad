"""The poller's version: the installed distribution's, which is pyproject.toml's ``version`` (the
one place it is written; ``poller --version`` and the ``sqs_poller_build_info`` metric read it)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from channels.registry import DISTRIBUTION

__all__ = ["poller_version"]


def poller_version() -> str:
    """The installed distribution's version; ``unknown`` for a source tree that was not installed."""
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "unknown"
