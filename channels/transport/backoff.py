"""Capped exponential backoff with jitter (urllib3's shape: ``base * 2**(n-1)``, capped)."""

from __future__ import annotations

import random

__all__ = ["backoff"]


def backoff(attempt: int, *, base: float, cap: float, jitter: float = 0.2,
            rng: random.Random | None = None) -> float:
    """Seconds to wait before try number ``attempt + 1`` (``attempt`` >= 1), +/- ``jitter``,
    never above ``cap``."""
    # The exponent is clamped: 2**1024 overflows a float, and counts can grow that large.
    delay = min(cap, base * 2.0 ** min(max(0, attempt - 1), 64))
    spread = delay * jitter
    return min(cap, max(0.0, delay + (rng or random).uniform(-spread, spread)))
