"""What a worker runs for each task type, and the errors handlers raise.

A handler gets a :class:`TaskContext` and must be idempotent: a task may be
delivered again after a worker died, after its effect already happened.
Raising :class:`PermanentError` fails the task at once; :class:`TaskBusy` puts it
back for later without using up an attempt; any other exception is transient and
retried with backoff until the type's attempts run out.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from opsmesh.task.v1 import task_pb2


class PermanentError(Exception):
    """The task can never succeed as it is (bad payload, refused by the target): no retry."""


class TaskBusy(Exception):
    """The task's effect is under way elsewhere (e.g. notify_svc is delivering the email for a
    call whose worker died): try again after ``retry_after`` seconds, without counting an
    attempt, since nothing failed."""

    def __init__(self, detail: str, retry_after: float) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class TaskCancelled(Exception):
    """The task was cancelled while it ran; raised by :meth:`TaskContext.check_cancelled`."""


class TaskContext(Protocol):
    @property
    def task(self) -> task_pb2.Task: ...

    @property
    def attempt(self) -> int: ...

    async def progress(self, step: str, done: int, total: int, message: str = "") -> None:
        """Records progress (visible in GetTask/WatchTask); raises TaskCancelled if asked to."""

    async def check_cancelled(self) -> None:
        """Raises TaskCancelled when CancelTask was called for this task."""


Handler = Callable[[TaskContext], Awaitable[None]]


async def workspace_without_cluster(context: TaskContext) -> None:
    raise PermanentError(
        "no Kubernetes cluster is configured for workspace tasks on this worker "
        "(set OPSMESH_KUBE_API and credentials); the task was not run"
    )


async def email_without_notifier(context: TaskContext) -> None:
    raise PermanentError(
        "email delivery is not configured on this worker (set OPSMESH_NOTIFY_ADDR to the "
        "notification service); the task was not run"
    )
