"""opsmesh.task.v1.TaskService: publish, read, watch, cancel and resubmit tasks."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator

from google.protobuf import json_format
from google.protobuf.message import Message

from mesh.context import current_principal
from mesh.errors import DependencyUnavailable, FailedPrecondition, InvalidArgument
from mesh.pagination import decode_token, encode_token, page_size
from mesh.servicer import Context, check_idempotency_key, parse_uuid
from opsmesh.errors.v1 import errors_pb2
from opsmesh.task.v1 import task_pb2, task_pb2_grpc
from task_svc import lease, states
from task_svc.config import RetryPolicy
from task_svc.outbox import OpenTasks
from task_svc.queue import Publisher
from task_svc.store import TaskStore, new_task_id, now

log = logging.getLogger("opsmesh.tasks")

SERVICE_NAME = task_pb2.DESCRIPTOR.services_by_name["TaskService"].full_name

_TOKEN_KIND = "tasks"  # noqa: S105 - a token kind, not a secret
_DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]{0,38}[a-z0-9])?")
_QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?")
_EMAIL = re.compile(r"[^@\s\r\n]{1,64}@[A-Za-z0-9.-]{1,253}\.[A-Za-z]{2,63}")
_MAX_NOTIFY_EMAILS = 20


def _task_id(value: str, field: str = "task_id") -> str:
    return parse_uuid(value, field, kind="task id")


def _check_workspace(payload: task_pb2.WorkspaceTaskPayload) -> None:
    if payload.action == task_pb2.WORKSPACE_ACTION_UNSPECIFIED:
        raise InvalidArgument(
            "payload.action must be PROVISION or DEPROVISION", field="payload.action"
        )
    if _DNS_LABEL.fullmatch(payload.workspace) is None:
        raise InvalidArgument(
            "payload.workspace must be a DNS label: 1-40 lowercase letters, digits or '-', "
            "starting with a letter and not ending with '-'",
            field="payload.workspace",
        )
    for name in ("cpu", "memory", "storage"):
        value = getattr(payload.quota, name)
        if value and _QUANTITY.fullmatch(value) is None:
            raise InvalidArgument(
                f"payload.quota.{name} {value[:32]!r} is not a Kubernetes quantity "
                "(e.g. 4, 500m, 8Gi)",
                field=f"payload.quota.{name}",
            )
    if not 0 <= payload.quota.pods <= 10_000:
        raise InvalidArgument("payload.quota.pods must be 0 to 10000", field="payload.quota.pods")
    if len(payload.notify_emails) > _MAX_NOTIFY_EMAILS:
        raise InvalidArgument(
            f"at most {_MAX_NOTIFY_EMAILS} notify_emails", field="payload.notify_emails"
        )
    for address in payload.notify_emails:
        if _EMAIL.fullmatch(address) is None:
            raise InvalidArgument(
                f"{address[:64]!r} is not an email address", field="payload.notify_emails"
            )


def with_typed_payload(task: task_pb2.Task) -> task_pb2.Task:
    """Sets ``task.workspace`` or ``task.email`` from the record's JSON payload, by task type.

    The record keeps the payload as a ``Struct`` (deprecated on the wire, where every number is a
    double); clients read the typed oneof. A payload that no longer parses (fields of a newer
    contract are ignored) leaves the oneof unset rather than failing the call.
    """
    typed: Message
    if task.type == task_pb2.TASK_TYPE_WORKSPACE:
        typed = task.workspace
    elif task.type == task_pb2.TASK_TYPE_EMAIL:
        typed = task.email
    else:
        return task
    try:
        json_format.ParseDict(
            json_format.MessageToDict(task.payload), typed, ignore_unknown_fields=True
        )
    except json_format.ParseError:
        task.ClearField("typed_payload")
        log.warning(
            "task %s: its payload does not parse as %s",
            task.id,
            typed.DESCRIPTOR.name,
            extra={"task_id": task.id},
        )
        return task
    typed.SetInParent()  # an empty payload still says which kind of task this is
    return task


def _with_payload(task: task_pb2.Task, payload: Message) -> task_pb2.Task:
    """A new task as the client reads it: the typed payload is the request's, as validated.

    What :func:`with_typed_payload` would parse back out of the record's JSON copy of that
    same payload, without converting it to JSON and back.
    """
    typed: Message = task.workspace if task.type == task_pb2.TASK_TYPE_WORKSPACE else task.email
    typed.CopyFrom(payload)
    typed.SetInParent()  # an empty payload still says which kind of task this is
    return task


class TaskService(task_pb2_grpc.TaskServiceServicer):
    def __init__(
        self, store: TaskStore, publisher: Publisher, retry: dict[int, RetryPolicy]
    ) -> None:
        self._store = store
        self._open = OpenTasks(store)
        self._publisher = publisher
        self._retry = retry

    async def _publish(
        self, task_type: int, payload: Message, idempotency_key: str
    ) -> task_pb2.Task:
        principal = current_principal()
        check_idempotency_key(idempotency_key)
        stamp = now()
        task = task_pb2.Task(
            id=new_task_id(),
            type=task_type,  # type: ignore[arg-type]
            status=task_pb2.TASK_STATUS_PENDING,
            org_id=principal.org_id,
            created_by=principal.user_id,
            idempotency_key=idempotency_key,
            max_attempts=self._retry[task_type].max_attempts,
            created_at=stamp,
            updated_at=stamp,
            version=1,
        )
        task.payload.update(json_format.MessageToDict(payload, preserving_proto_field_name=True))
        stored, revision, created, marker = await self._record(task)
        if not created:
            await self._open.discard(task)
            return with_typed_payload(stored)
        try:
            await self._publisher.publish(stored, revision, marker=marker)
        except DependencyUnavailable:
            # Nothing was queued: remove the record so that the client's retry with the same
            # idempotency key starts afresh.
            try:
                await self._store.forget(stored)
            except DependencyUnavailable:
                log.error(
                    "task %s was recorded but not queued and could not be removed; the "
                    "reaper queues it once NATS is back",
                    stored.id,
                    extra={"task_id": stored.id},
                )
            raise
        # The marker stays "publish": turning it to "queued" here would cost every publish
        # another round trip. The reaper's first look (within the outbox grace, well inside
        # JetStream's duplicate window) re-publishes with the same message id, which JetStream
        # drops, and turns it to "queued" then; a task finished before that has had its marker
        # removed by its worker.
        return _with_payload(stored, payload)

    async def _record(self, task: task_pb2.Task) -> tuple[task_pb2.Task, int, bool, int]:
        """Writes the outbox marker, then the record: a crash after the marker leaves a task the
        reaper publishes (or, with no record, a marker it removes), never a recorded task that
        nobody runs. Returns the stored task, its revision, whether it is new, and the marker's
        revision.

        Both writes go out back to back on one connection without waiting for the marker's
        acknowledgement (a round trip on every publish): asyncio starts the two in order, and
        JetStream stores one connection's messages to one stream (the bucket) in order.
        """
        marked, recorded = await asyncio.gather(
            self._open.publishing(task), self._store.create(task), return_exceptions=True
        )
        if isinstance(recorded, BaseException):
            raise recorded
        if isinstance(marked, BaseException):
            await self._store.forget(task)  # no marker, no record: the client may try again
            raise marked
        stored, revision, created = recorded
        return stored, revision, created, marked

    async def PublishWorkspaceTask(
        self, request: task_pb2.PublishWorkspaceTaskRequest, context: Context
    ) -> task_pb2.PublishWorkspaceTaskResponse:
        _check_workspace(request.payload)
        task = await self._publish(
            task_pb2.TASK_TYPE_WORKSPACE, request.payload, request.idempotency_key
        )
        return task_pb2.PublishWorkspaceTaskResponse(task=task)

    async def PublishEmailTask(
        self, request: task_pb2.PublishEmailTaskRequest, context: Context
    ) -> task_pb2.PublishEmailTaskResponse:
        _task_id(request.payload.notification_id, "payload.notification_id")
        task = await self._publish(
            task_pb2.TASK_TYPE_EMAIL, request.payload, request.idempotency_key
        )
        return task_pb2.PublishEmailTaskResponse(task=task)

    async def GetTask(
        self, request: task_pb2.GetTaskRequest, context: Context
    ) -> task_pb2.GetTaskResponse:
        task_id = _task_id(request.task_id)
        return task_pb2.GetTaskResponse(
            task=with_typed_payload(await self._store.get(current_principal().org_id, task_id))
        )

    async def ListTasks(
        self, request: task_pb2.ListTasksRequest, context: Context
    ) -> task_pb2.ListTasksResponse:
        limit = page_size(request.page_size, default=50, maximum=200)
        cursor = decode_token(request.page_token, _TOKEN_KIND)
        if cursor is not None:
            cursor = _task_id(cursor, "page_token")
        tasks, next_cursor = await self._store.page(
            current_principal().org_id,
            before=cursor,
            limit=limit,
            statuses=frozenset(request.statuses),
            types=frozenset(request.types),
        )
        return task_pb2.ListTasksResponse(
            tasks=[with_typed_payload(task) for task in tasks],
            next_page_token=encode_token(_TOKEN_KIND, next_cursor) if next_cursor else "",
        )

    async def WatchTask(
        self, request: task_pb2.WatchTaskRequest, context: Context
    ) -> AsyncIterator[task_pb2.WatchTaskResponse]:
        task_id = _task_id(request.task_id)
        last_version = 0
        async for task in self._store.watch(current_principal().org_id, task_id):
            if task.version <= last_version:
                continue
            last_version = task.version
            yield task_pb2.WatchTaskResponse(task=with_typed_payload(task))
            if task.status in states.TERMINAL:
                return

    async def CancelTask(
        self, request: task_pb2.CancelTaskRequest, context: Context
    ) -> task_pb2.CancelTaskResponse:
        task_id = _task_id(request.task_id)
        reason = request.reason[:500] or "cancelled by the user"

        def cancel(task: task_pb2.Task) -> None:
            if task.status in states.TERMINAL:
                raise FailedPrecondition(
                    f"task {task_id} is already {states.name(task.status)}",
                    reason=errors_pb2.ERROR_REASON_TASK_FINISHED,
                )
            if task.status == states.RUNNING and not lease.is_stale(task):
                # Its worker notices at the next lease renewal, stops the handler and
                # records the cancellation.
                task.cancel_requested = True
                return
            if task.status == states.RUNNING:  # its worker died: nobody else would finish it
                task.attempts[-1].ended_at.CopyFrom(now())
                task.attempts[-1].error = lease.STALE_ATTEMPT_ERROR
            task.status = states.CANCELLED
            task.error = reason

        task, _ = await self._store.change(current_principal().org_id, task_id, cancel)
        return task_pb2.CancelTaskResponse(task=with_typed_payload(task))

    async def RetryTask(
        self, request: task_pb2.RetryTaskRequest, context: Context
    ) -> task_pb2.RetryTaskResponse:
        task_id = _task_id(request.task_id)

        def resubmit(task: task_pb2.Task) -> None:
            if lease.is_stale(task):  # its worker died mid-attempt
                task.attempts[-1].ended_at.CopyFrom(now())
                task.attempts[-1].error = lease.STALE_ATTEMPT_ERROR
            elif task.status not in (states.FAILED, states.CANCELLED):
                raise FailedPrecondition(
                    f"only failed, cancelled or abandoned tasks can be retried; task "
                    f"{task_id} is {states.name(task.status)}",
                    reason=errors_pb2.ERROR_REASON_TASK_NOT_RETRYABLE,
                )
            task.status = states.PENDING
            task.retry_count = 0
            task.cancel_requested = False
            task.error = ""
            task.progress.Clear()

        org_id = current_principal().org_id
        resubmit(await self._store.get(org_id, task_id))  # refuse before marking anything
        # Marked before the record changes: a crash between the two steps leaves a pending
        # task the reaper publishes.
        marker = await self._open.publishing(task_pb2.Task(id=task_id, org_id=org_id))
        task, revision = await self._store.change(org_id, task_id, resubmit)
        await self._publisher.publish(task, revision, marker=marker)
        return task_pb2.RetryTaskResponse(task=with_typed_payload(task))
