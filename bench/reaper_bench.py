"""What a reaper pass's walk of the open-task markers costs once many tasks have finished.

Every finished task's marker is removed with a KV delete, which leaves a tombstone for
the bucket's retention (30 days), and the walk meets every one. The run stages live
markers and tombstones in a real nats-server's records bucket, then times the walk
(``OpenTasks.survey``) as it was, with every tombstone, and after the sweep a pass makes
once it meets ``sweep_after`` of them, in one run, and prints the ratio.

    PYTHONPATH=. .venv/bin/python bench/reaper_bench.py [--tombstones 20000] [--live 200]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from devtools.servers import NatsServer
from mesh.natsconn import NatsSettings, connect_nats
from opsmesh.task.v1 import task_pb2
from task_svc.config import Topology
from task_svc.outbox import OpenTasks, marker_key
from task_svc.reaper import ReaperSettings
from task_svc.store import TaskStore, new_task_id

_BATCH = 2000


async def stage(store: TaskStore, *, tombstones: int, live: int) -> None:
    """Tombstones and live markers interleaved, as finished and open tasks leave them."""
    open_tasks = OpenTasks(store)
    live_every = max(1, tombstones // max(1, live))
    staged_live = 0
    for start in range(0, tombstones, _BATCH):
        tasks = [
            task_pb2.Task(id=new_task_id(), org_id="bench")
            for _ in range(min(_BATCH, tombstones - start))
        ]
        await asyncio.gather(*(open_tasks.publishing(task) for task in tasks))
        await asyncio.gather(*(store.kv.delete(marker_key(task.org_id, task.id)) for task in tasks))
        while staged_live < live and staged_live * live_every < start + len(tasks):
            await open_tasks.publishing(task_pb2.Task(id=new_task_id(), org_id="bench"))
            staged_live += 1
    while staged_live < live:
        await open_tasks.publishing(task_pb2.Task(id=new_task_id(), org_id="bench"))
        staged_live += 1


async def walk_seconds(open_tasks: OpenTasks, rounds: int) -> tuple[float, int, int]:
    """Median seconds of a walk, and what it found (markers, tombstones)."""
    times = []
    for _ in range(rounds):
        began = time.perf_counter()
        survey = await open_tasks.survey()
        times.append(time.perf_counter() - began)
    return statistics.median(times), len(survey.markers), len(survey.tombstones)


async def run(tombstones: int, live: int, rounds: int, sweep_after: int) -> None:
    with tempfile.TemporaryDirectory() as workdir:
        server = NatsServer(Path(workdir)).start()
        try:
            client = await connect_nats(NatsSettings(url=server.url), name="reaper-bench")
            js = client.jetstream(timeout=30.0)
            store = await TaskStore.open(
                client, js, Topology(namespace="reaperbench"), request_timeout=30.0
            )
            await stage(store, tombstones=tombstones, live=live)
            open_tasks = OpenTasks(store)
            before, markers, found = await walk_seconds(open_tasks, rounds)
            began = time.perf_counter()
            swept, passes = 0, 0
            while len((survey := await open_tasks.survey()).tombstones) >= sweep_after:
                swept += await open_tasks.sweep(survey)  # what successive passes do
                passes += 1
            sweep_seconds = time.perf_counter() - began
            after, markers_after, left = await walk_seconds(open_tasks, rounds)
            await client.close()
        finally:
            server.stop()
    print(f"reaper bench: a pass's walk of {live} open-task markers after {tombstones} tasks")
    print(f"{'walk':34} {'ms':>9} {'markers':>8} {'tombstones':>11}")
    print(f"{'every tombstone (before sweeping)':34} {before * 1e3:9.1f} {markers:8} {found:11}")
    print(f"{'after sweeping':34} {after * 1e3:9.1f} {markers_after:8} {left:11}")
    print(
        f"sweeping took {passes} passes, {sweep_seconds * 1e3:.0f} ms in all, for {swept} "
        f"tombstones (a pass rewrites at most 100 live markers to let its cut pass them)"
    )
    print(f"walk after / before: {after / before:.3f}x ({before / after:.0f}x faster)")
    print(
        f"every tombstone costs the walk {(before - after) / max(1, found) * 1e6:.0f} us; "
        "30 days at 1 task/s would be 2.6 million of them"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tombstones", type=int, default=20000)
    parser.add_argument("--live", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sweep-after", type=int, default=ReaperSettings.sweep_after)
    args = parser.parse_args()
    asyncio.run(run(args.tombstones, args.live, args.rounds, args.sweep_after))


if __name__ == "__main__":
    main()
