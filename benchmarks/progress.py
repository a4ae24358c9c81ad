"""Progress bars (tqdm) that share stderr with the log lines."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

try:
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm
except ImportError as exc:  # the bench extra is not installed
    raise SystemExit("the benchmarks need tqdm and matplotlib: pip install -e '.[bench]' (or: make bench)") from exc

__all__ = ["bar", "bars_and_logs"]

# On a terminal the bar redraws in place; in a log file (CI, `make bench > out`) a line every
# few seconds is enough.
_MININTERVAL = 0.25 if sys.stderr.isatty() else 5.0


def bar(*, total: float, desc: str, unit: str = "msg") -> Any:
    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True,
                mininterval=_MININTERVAL, file=sys.stderr)


@contextlib.contextmanager
def bars_and_logs() -> Iterator[None]:
    """Log lines go through tqdm.write, so they do not tear a bar in half."""
    with logging_redirect_tqdm(loggers=[logging.getLogger()]):
        yield
