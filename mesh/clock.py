"""A wall clock in milliseconds that never repeats or goes back within a process."""

from __future__ import annotations

import threading
import time


class StrictMillis:
    """Hands out Unix milliseconds, each strictly greater than the last one handed out.

    Records ordered by a millisecond stamp (chat messages, time-ordered ids) would
    otherwise tie when written within one millisecond and then list in random order.
    A burst faster than one per millisecond runs ahead of the wall clock by at most
    the burst's length, and the clock catches up afterwards.
    """

    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()

    def next(self) -> int:
        now = time.time_ns() // 1_000_000
        with self._lock:
            self._last = max(now, self._last + 1)
            return self._last
