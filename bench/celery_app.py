"""The Celery baseline of bench/task_bench.py: a no-op task, acks_late, Redis broker."""

from __future__ import annotations

import os
import time

from celery import Celery

app = Celery(
    "opsmesh_bench",
    broker=os.environ.get("BENCH_CELERY_BROKER", "redis://127.0.0.1:6379/0"),
    backend=os.environ.get("BENCH_CELERY_BROKER", "redis://127.0.0.1:6379/0"),
)
app.conf.update(
    task_acks_late=True,  # acknowledge after the task ran, as our worker does
    task_track_started=True,  # status tracking on: STARTED is recorded, like RUNNING
    worker_prefetch_multiplier=4,
    result_expires=3600,
    broker_connection_retry_on_startup=True,
)


@app.task(name="noop")
def noop() -> float:
    return time.time()
