"""A worker process with a test handler whose effects are recorded in Redis.

Started by the fault tests as ``python -m tests.task_worker_process`` with the
worker's usual OPSMESH_* environment plus EFFECTS_REDIS_URL and HANDLER_SECONDS.
"""

from __future__ import annotations

import asyncio
import os

import redis.asyncio as aioredis

from mesh.server import run
from opsmesh.task.v1 import task_pb2
from task_svc.handlers import TaskContext
from task_svc.worker import serve


def main() -> None:
    effects = aioredis.Redis.from_url(os.environ["EFFECTS_REDIS_URL"])
    seconds = float(os.environ.get("HANDLER_SECONDS", "0"))

    async def handler(context: TaskContext) -> None:
        task_id = context.task.id
        await effects.incr(f"calls:{task_id}")
        await asyncio.sleep(seconds)
        # The idempotent effect: recorded once per task, however often it is delivered.
        if await effects.set(f"effect:{task_id}", os.environ["OPSMESH_WORKER_ID"], nx=True):
            await effects.incr("effects")

    run(serve(os.environ, handlers={task_pb2.TASK_TYPE_EMAIL: handler}))


if __name__ == "__main__":
    main()
