"""Email tasks: the worker asks the notification service to deliver the notification."""

from __future__ import annotations

import grpc
from grpc import aio

from mesh.clients import identity_metadata
from mesh.context import Principal
from opsmesh.notify.v1 import notify_pb2, notify_pb2_grpc
from task_svc.handlers import Handler, PermanentError, TaskContext

# Codes after which the same call may succeed later.
_TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)


def email_handler(channel: aio.Channel, *, timeout: float = 60.0) -> Handler:
    notifications = notify_pb2_grpc.NotificationServiceStub(channel)

    async def deliver(context: TaskContext) -> None:
        task = context.task
        owner = Principal(user_id=task.created_by, org_id=task.org_id)
        try:
            await notifications.DeliverNotification(
                notify_pb2.DeliverNotificationRequest(
                    notification_id=str(task.payload["notification_id"])
                ),
                metadata=identity_metadata(owner),
                timeout=timeout,
            )
        except aio.AioRpcError as error:
            detail = f"notification service: {error.code().name}: {error.details()}"
            if error.code() in _TRANSIENT:
                raise ConnectionError(detail) from error
            raise PermanentError(detail) from error

    return deliver
