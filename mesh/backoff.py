"""Retry delays shared by the model client and the task worker."""

from __future__ import annotations

import random


def half_jitter(attempt: int, *, base: float, cap: float) -> float:
    """Delay before retry ``attempt`` (1-based): exponential, capped, the upper half jittered.

    Half jitter rather than full: a retry never comes back sooner than half the ceiling,
    while concurrent retriers still spread out.
    """
    ceiling = min(cap, base * 2.0 ** (attempt - 1))
    return ceiling / 2 + random.uniform(0, ceiling / 2)  # noqa: S311 - jitter, not security
