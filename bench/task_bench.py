"""End-to-end task throughput and publish→start latency: opsmesh vs Celery, in one run.

* opsmesh: PublishEmailTask over gRPC to a real ``task_svc`` process, a real worker
  process (no-op handler, status tracked in the JetStream bucket), nats-server -js;
  done = the record reached SUCCEEDED (watched on the bucket).
* Celery: ``noop.delay()`` to a Redis broker, a prefork worker (one process per core),
  ``acks_late`` and ``task_track_started`` with a Redis result backend; done = the
  result is stored.

Both run N no-op tasks (default 10,000) published by 64 concurrent publishers.
Prints tasks/s and publish→start p50/p99 for both, and the ratio against the
target (>= 3x Celery's throughput, p50 publish→start <= 5 ms).

    .venv/bin/pip install 'celery[redis]'   # dev-only, for this bench
    .venv/bin/python bench/task_bench.py [--tasks 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nats
import uvloop
from grpc import aio
from measure import percentile as pct

from devtools.servers import ManagedProcess, NatsServer, RedisServer, free_port
from mesh.auth import ORG_HEADER, USER_HEADER
from opsmesh.task.v1 import task_pb2 as pb
from opsmesh.task.v1 import task_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
METADATA = ((USER_HEADER, "bench"), (ORG_HEADER, "bench-org"))
PUBLISHERS = 64


async def finished_count(metrics_port: int) -> float:
    def scrape() -> float:
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("opsmesh_tasks_finished_total{") and 'outcome="succeeded"' in line
        )

    return await asyncio.to_thread(scrape)


async def bench_opsmesh(count: int, probes: int, workdir: Path) -> tuple[float, list[float]]:
    """Throughput of ``count`` concurrent tasks; publish->start of ``probes`` tasks one by one."""
    nats_server = NatsServer(workdir / "nats").start()
    namespace = f"bench{uuid.uuid4().hex[:6]}"
    grpc_port = free_port()
    worker_metrics = free_port()
    env = dict(
        os.environ,
        OPSMESH_NATS_URL=nats_server.url,
        OPSMESH_TASK_NAMESPACE=namespace,
        OPSMESH_GRPC_PORT=str(grpc_port),
        OPSMESH_METRICS_PORT="0",
        OPSMESH_LOG_LEVEL="INFO",
    )
    service = ManagedProcess(
        "task_svc",
        [sys.executable, "-m", "task_svc"],
        log_path=workdir / "task_svc.log",
        ready=re.compile(r"serving opsmesh\.task\.v1\.TaskService"),
        env=env,
    )
    worker = ManagedProcess(
        "worker",
        [sys.executable, str(ROOT / "bench" / "noop_task_worker.py")],
        log_path=workdir / "worker.log",
        ready=re.compile(r"worker \S+ consuming"),
        env=dict(
            env,
            OPSMESH_GRPC_PORT=str(free_port()),
            OPSMESH_WORKER_CONCURRENCY="64",
            OPSMESH_WORKER_ID="bench-worker",
            OPSMESH_METRICS_PORT=str(worker_metrics),
        ),
    )
    service.start()
    worker.start()
    try:
        client = await nats.connect(nats_server.url)
        kv = await client.jetstream().key_value(f"{namespace}_tasks")
        watcher = await kv.watch("t.>")
        finished: dict[str, asyncio.Event] = {}
        started_after: dict[str, float] = {}

        def finished_event(task_id: str) -> asyncio.Event:
            return finished.setdefault(task_id, asyncio.Event())

        async def follow() -> None:
            while True:
                entry = await watcher.updates(timeout=120)
                if entry is None or not entry.value:
                    continue
                task = pb.Task.FromString(entry.value)
                if task.status == pb.TASK_STATUS_SUCCEEDED and task.id not in started_after:
                    start = task.attempts[0].started_at
                    started_after[task.id] = (
                        start.ToNanoseconds() - task.created_at.ToNanoseconds()
                    ) / 1e6
                    finished_event(task.id).set()

        follower = asyncio.create_task(follow())
        async with aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = task_pb2_grpc.TaskServiceStub(channel)

            async def publish() -> str:
                reply = await stub.PublishEmailTask(
                    pb.PublishEmailTaskRequest(
                        payload=pb.EmailTaskPayload(notification_id=str(uuid.uuid4()))
                    ),
                    metadata=METADATA,
                )
                return str(reply.task.id)

            latencies = []
            for _ in range(probes):  # an idle system: one task at a time
                task_id = await publish()
                await asyncio.wait_for(finished_event(task_id).wait(), 60)
                latencies.append(started_after[task_id])

            # Throughput: completion is read off the worker's own counter of tasks it
            # recorded as succeeded, so the bench does not compete for CPU watching records.
            remaining = count
            baseline = await finished_count(worker_metrics)

            async def publisher() -> None:
                nonlocal remaining
                while remaining > 0:
                    remaining -= 1
                    await publish()

            began = time.perf_counter()
            await asyncio.gather(*(publisher() for _ in range(PUBLISHERS)))
            deadline = time.monotonic() + 600
            while await finished_count(worker_metrics) < baseline + count:
                if time.monotonic() > deadline:
                    raise TimeoutError("the worker did not finish the tasks in 10 minutes")
                await asyncio.sleep(0.05)
            elapsed = time.perf_counter() - began
        follower.cancel()
        await watcher.stop()
        await client.close()
        return count / elapsed, latencies
    finally:
        worker.stop()
        service.stop()
        nats_server.stop()


def bench_celery(count: int, probes: int, workdir: Path) -> tuple[float, list[float]] | None:
    try:
        from celery_app import app, noop  # the bench folder is on sys.path
    except ImportError:
        print("celery is not installed: pip install 'celery[redis]' for the baseline")
        return None
    redis_server = RedisServer(workdir / "celery-redis").start()
    broker = f"redis://127.0.0.1:{redis_server.port}/0"
    app.conf.broker_url = broker
    app.conf.result_backend = broker
    celery_bin = shutil.which("celery") or str(Path(sys.executable).parent / "celery")
    worker = ManagedProcess(
        "celery",
        [
            celery_bin,
            "-A",
            "bench.celery_app",
            "worker",
            "--loglevel=INFO",
            f"--concurrency={os.cpu_count() or 2}",
            "--without-gossip",
            "--without-mingle",
        ],
        log_path=workdir / "celery.log",
        ready=re.compile(r"celery@\S+ ready"),
        env=dict(os.environ, BENCH_CELERY_BROKER=broker, PYTHONPATH=str(ROOT)),
    )
    worker.start(timeout=60)
    try:
        latencies = []
        for _ in range(probes):  # an idle system: one task at a time
            sent = time.time()
            latencies.append((noop.delay().get(timeout=60) - sent) * 1000)

        results = []

        def publish(_: int) -> None:
            results.append(noop.delay())

        began = time.perf_counter()
        with ThreadPoolExecutor(PUBLISHERS) as pool:
            list(pool.map(publish, range(count)))
        for result in results:
            result.get(timeout=600)
        elapsed = time.perf_counter() - began
        return count / elapsed, latencies
    finally:
        worker.stop()
        redis_server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--probes", type=int, default=200, help="tasks for publish->start")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="task-bench-"))
    print(
        f"task bench: throughput of {args.tasks} no-op tasks from {PUBLISHERS} concurrent "
        f"publishers; publish->start of {args.probes} tasks sent one at a time\n"
    )
    ours_rate, ours_latency = uvloop.run(bench_opsmesh(args.tasks, args.probes, workdir))
    celery = bench_celery(args.tasks, args.probes, workdir)
    print(f"{'system':<36}{'tasks/s':>8}{'start p50 ms':>14}{'start p99 ms':>14}")
    print(
        f"{'opsmesh (JetStream + KV status)':<36}{ours_rate:>8.0f}"
        f"{pct(ours_latency, 0.5):>14.1f}{pct(ours_latency, 0.99):>14.1f}"
    )
    ok = pct(ours_latency, 0.5) <= 5
    if celery is not None:
        celery_rate, celery_latency = celery
        print(
            f"{'celery (redis, acks_late, STARTED)':<36}{celery_rate:>8.0f}"
            f"{pct(celery_latency, 0.5):>14.1f}{pct(celery_latency, 0.99):>14.1f}"
        )
        ratio = ours_rate / celery_rate
        print(f"\nthroughput ratio opsmesh/celery: {ratio:.2f}x (target >= 3x)")
        ok = ok and ratio >= 3
    print(f"publish->start p50: {pct(ours_latency, 0.5):.1f} ms (target <= 5 ms)")
    print("targets met" if ok else "targets NOT met")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
