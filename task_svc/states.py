"""The task status machine: which transitions are allowed, and which statuses are final."""

from __future__ import annotations

from opsmesh.task.v1 import task_pb2

PENDING = task_pb2.TASK_STATUS_PENDING
RUNNING = task_pb2.TASK_STATUS_RUNNING
RETRYING = task_pb2.TASK_STATUS_RETRYING
SUCCEEDED = task_pb2.TASK_STATUS_SUCCEEDED
FAILED = task_pb2.TASK_STATUS_FAILED
CANCELLED = task_pb2.TASK_STATUS_CANCELLED

TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})

# RUNNING -> RUNNING: a redelivery after a worker died mid-task starts a new attempt.
ALLOWED: dict[int, frozenset[int]] = {
    PENDING: frozenset({RUNNING, CANCELLED, FAILED}),
    RUNNING: frozenset({RUNNING, RETRYING, SUCCEEDED, FAILED, CANCELLED}),
    RETRYING: frozenset({RUNNING, CANCELLED, FAILED}),
    SUCCEEDED: frozenset(),
    FAILED: frozenset({PENDING}),
    CANCELLED: frozenset({PENDING}),
}


def name(status: int) -> str:
    return task_pb2.TaskStatus.Name(status).removeprefix("TASK_STATUS_").lower()


class TransitionError(Exception):
    """A transition the status machine does not allow."""

    def __init__(self, current: int, wanted: int) -> None:
        super().__init__(f"a {name(current)} task cannot become {name(wanted)}")
        self.current = current
        self.wanted = wanted


def check(current: int, wanted: int) -> None:
    if wanted not in ALLOWED[current]:
        raise TransitionError(current, wanted)
