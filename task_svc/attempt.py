"""One running attempt: what its handler sees, and the keeper of its lease.

Every write the attempt makes checks that it still owns the task (see
:func:`lease.check_owner`), so a worker that was taken for dead and comes back
cannot overwrite the work of the one that took over.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from nats.aio.msg import Msg

from mesh.errors import DependencyUnavailable
from opsmesh.task.v1 import task_pb2
from task_svc import lease
from task_svc.handlers import TaskCancelled

if TYPE_CHECKING:
    from task_svc.store import TaskStore

log = logging.getLogger("opsmesh.worker")


class AttemptContext:
    """What a handler sees of the task it runs (implements handlers.TaskContext)."""

    def __init__(
        self, store: TaskStore, task: task_pb2.Task, revision: int, *, worker_id: str
    ) -> None:
        self._store = store
        self.task = task
        self.revision = revision
        self.worker_id = worker_id
        self.attempt = len(task.attempts)
        # The handler's progress and the lease keeper write concurrently; one at a time
        # keeps (task, revision) the latest pair.
        self._writing = asyncio.Lock()

    async def change(self, mutate: Callable[[task_pb2.Task], None]) -> None:
        """Changes the record if this attempt still owns it; raises LeaseLost otherwise."""

        def owned(task: task_pb2.Task) -> None:
            lease.check_owner(task, self.worker_id, self.attempt)
            mutate(task)

        async with self._writing:
            self.task, self.revision = await self._store.change(
                self.task.org_id, self.task.id, owned, known=(self.task, self.revision)
            )

    async def progress(self, step: str, done: int, total: int, message: str = "") -> None:
        def record(task: task_pb2.Task) -> None:
            task.progress.CopyFrom(
                task_pb2.TaskProgress(
                    step=step, steps_done=done, steps_total=total, message=message
                )
            )

        await self.change(record)
        if self.task.cancel_requested:
            raise TaskCancelled()

    async def check_cancelled(self) -> None:
        async with self._writing:
            self.task, self.revision = await self._store.read(self.task.org_id, self.task.id)
        if self.task.cancel_requested:
            raise TaskCancelled()

    async def renew(self, ttl: float) -> None:
        await self.change(lease.renew(self.worker_id, self.attempt, ttl))


class LeaseKeeper:
    """Renews a running attempt's lease and JetStream's ack deadline every ``interval``.

    A timer rather than a task per message: most tasks finish before the first beat.
    Each renewal reads the record back, so it also notices CancelTask: then, or when
    the lease was lost to another worker, it cancels the handler and says why in
    :attr:`stopped`.
    """

    def __init__(
        self,
        context: AttemptContext,
        message: Msg,
        handler: asyncio.Task[None],
        *,
        ttl: float,
        interval: float,
    ) -> None:
        self._context = context
        self._message = message
        self._handler = handler
        self._ttl = ttl
        self._interval = interval
        self.stopped: BaseException | None = None
        self._loop = asyncio.get_running_loop()
        self._beat: asyncio.Task[None] | None = None
        self._timer = self._loop.call_later(interval, self._fire)

    def _fire(self) -> None:
        self._beat = self._loop.create_task(self._renew())
        self._timer = self._loop.call_later(self._interval, self._fire)

    async def _renew(self) -> None:
        await quietly(self._message.in_progress())
        try:
            await self._context.renew(self._ttl)
        except lease.LeaseLost as lost:
            self._stop(lost)
            return
        except DependencyUnavailable as error:
            # NATS is away: the lease may lapse and the task be taken over, which the next
            # renewal (or the outcome's write) notices.
            log.warning("task %s: lease not renewed: %s", self._context.task.id, error.message)
            return
        if self._context.task.cancel_requested:
            self._stop(TaskCancelled())

    def _stop(self, reason: BaseException) -> None:
        if self.stopped is None:
            self.stopped = reason
            self._handler.cancel()

    def cancel(self) -> None:
        self._timer.cancel()
        if self._beat is not None:
            self._beat.cancel()


async def quietly(action: object) -> None:
    try:
        await action  # type: ignore[misc]
    except Exception as error:  # noqa: BLE001 - acks/heartbeats are best effort
        log.debug("ignored: %s", error)
