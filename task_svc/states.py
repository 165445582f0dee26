"""Task statuses, and which of them are final.

The transitions themselves live where they happen: the worker (pending/retrying →
running → succeeded/retrying/failed/cancelled) and the service (cancel, retry).
"""

from __future__ import annotations

from opsmesh.task.v1 import task_pb2

PENDING = task_pb2.TASK_STATUS_PENDING
RUNNING = task_pb2.TASK_STATUS_RUNNING
RETRYING = task_pb2.TASK_STATUS_RETRYING
SUCCEEDED = task_pb2.TASK_STATUS_SUCCEEDED
FAILED = task_pb2.TASK_STATUS_FAILED
CANCELLED = task_pb2.TASK_STATUS_CANCELLED

TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})


def name(status: int) -> str:
    return task_pb2.TaskStatus.Name(status).removeprefix("TASK_STATUS_").lower()
