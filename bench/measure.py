"""What every bench measures the same way: sequential latencies, concurrent throughput."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def latencies(call: Callable[[], Awaitable[object]], count: int) -> list[float]:
    """Seconds per call, one call at a time, after a warm-up (connections, caches)."""
    for _ in range(min(200, count)):
        await call()
    samples = []
    for _ in range(count):
        began = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - began)
    return samples


async def throughput(
    call: Callable[[], Awaitable[object]], seconds: float, concurrency: int
) -> float:
    """Calls per second with ``concurrency`` callers for ``seconds``."""
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await call()
            done += 1

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - began)


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User + system CPU time a process (or one of its threads) has used so far (Linux /proc),
    to price a run's work."""
    stat = f"/proc/{pid}/task/{thread}/stat" if thread is not None else f"/proc/{pid}/stat"
    fields = Path(stat).read_text().rsplit(")", 1)[1].split()
    # Fields 14 and 15 of proc(5) (utime, stime); index 11/12 after the command name is cut.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
