"""A task worker whose email handler does nothing: the bench measures the machinery only."""

from __future__ import annotations

import os

from mesh.server import run
from opsmesh.task.v1 import task_pb2
from task_svc.handlers import TaskContext
from task_svc.worker import serve


async def noop(context: TaskContext) -> None:
    return None


if __name__ == "__main__":
    run(serve(os.environ, handlers={task_pb2.TASK_TYPE_EMAIL: noop}))
