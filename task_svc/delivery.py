"""The worker's side of email: delivering email tasks, sending provisioning emails."""

from __future__ import annotations

from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc import aio
from grpc_status import rpc_status

from mesh.clients import Credentials, trusted_headers
from mesh.context import Principal
from opsmesh.notify.v1 import notify_pb2, notify_pb2_grpc
from opsmesh.task.v1 import task_pb2
from task_svc.handlers import Handler, PermanentError, TaskBusy, TaskContext

# Codes after which the same call may succeed later.
_TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)


def email_handler(
    channel: aio.Channel, *, credentials: Credentials = trusted_headers, timeout: float = 60.0
) -> Handler:
    notifications = notify_pb2_grpc.NotificationServiceStub(channel)

    async def deliver(context: TaskContext) -> None:
        task = context.task
        owner = _as_service(task)
        try:
            await notifications.DeliverNotification(
                notify_pb2.DeliverNotificationRequest(
                    notification_id=str(task.payload["notification_id"])
                ),
                metadata=await credentials(owner),
                timeout=timeout,
            )
        except aio.AioRpcError as error:
            detail = f"notification service: {error.code().name}: {error.details()}"
            retry_after = _retry_after(error)
            if error.code() == grpc.StatusCode.ABORTED and retry_after is not None:
                # Another call holds the delivery (single-flight): it is not a failure.
                raise TaskBusy(detail, retry_after) from error
            if error.code() in _TRANSIENT:
                raise ConnectionError(detail) from error
            raise PermanentError(detail) from error

    return deliver


def _as_service(task: task_pb2.Task) -> Principal:
    """The worker calls notify_svc as a service acting for the task's owner and org.

    Service credentials carry the ``service`` role in the token; with trusted headers the
    role travels as a header. notify_svc lets only services deliver and send these emails.
    """
    return Principal(user_id=task.created_by, org_id=task.org_id, roles=frozenset({"service"}))


def _retry_after(error: aio.AioRpcError) -> float | None:
    """The server's RetryInfo delay, in seconds, if its error carries one."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.ToNanoseconds()) / 1e9
    return None


def notify_emails(task: task_pb2.Task) -> list[str]:
    """The addresses a workspace task's payload asks to keep informed."""
    listed = task.payload.fields.get("notify_emails")
    return [] if listed is None else [v.string_value for v in listed.list_value.values]


class ProvisioningEmails:
    """Sends a workspace task's provisioning emails through the notification service."""

    def __init__(
        self,
        channel: aio.Channel,
        *,
        credentials: Credentials = trusted_headers,
        timeout: float = 10.0,
    ) -> None:
        self._notifications = notify_pb2_grpc.NotificationServiceStub(channel)
        self._credentials = credentials
        self._timeout = timeout

    async def __call__(self, task: task_pb2.Task, template: str, data: dict[str, Any]) -> None:
        request = notify_pb2.SendEmailRequest(
            template=template,
            to=[notify_pb2.Recipient(address=address) for address in notify_emails(task)],
            # One email per task and stage, however often the task is delivered.
            idempotency_key=f"task:{task.id}:{template}",
        )
        request.data.update(data)
        owner = _as_service(task)
        await self._notifications.SendEmail(
            request, metadata=await self._credentials(owner), timeout=self._timeout
        )
