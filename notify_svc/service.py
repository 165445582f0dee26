"""opsmesh.notify.v1.NotificationService: templates, previews, sending and delivery.

Who may call what is in notify_svc/authz.py and the catalog's per-template senders;
delivery guarantees (one delivery at a time, crash-safe recording) in docs/notifications.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from google.protobuf import json_format, struct_pb2

from mesh.clients import Credentials, trusted_headers
from mesh.context import Principal, current_principal
from mesh.downstream import Deadline, downstream_errors
from mesh.errors import DependencyUnavailable, FailedPrecondition
from mesh.servicer import Context, check_idempotency_key, parse_uuid
from notify_svc.authz import DELIVER_ROLES, PREVIEW_ROLES, require_role
from notify_svc.catalog import Catalog, resolve_locale
from notify_svc.messages import build_message, check_all
from notify_svc.providers import Delivery, Provider
from notify_svc.rendering import RenderedEmail, Renderer
from notify_svc.shielded import ShieldedTasks
from notify_svc.smtp import DeliveryError
from notify_svc.store import NotificationStore, new_notification_id
from opsmesh.errors.v1 import errors_pb2
from opsmesh.notify.v1 import notify_pb2, notify_pb2_grpc
from opsmesh.task.v1 import task_pb2, task_pb2_grpc

log = logging.getLogger("opsmesh.notify")

SERVICE_NAME = notify_pb2.DESCRIPTOR.services_by_name["NotificationService"].full_name

QUEUED = notify_pb2.NOTIFICATION_STATUS_QUEUED
SENDING = notify_pb2.NOTIFICATION_STATUS_SENDING
SENT = notify_pb2.NOTIFICATION_STATUS_SENT
FAILED = notify_pb2.NOTIFICATION_STATUS_FAILED


def _notification_id(value: str) -> str:
    return parse_uuid(value, "notification_id", kind="notification id")


class NotificationService(notify_pb2_grpc.NotificationServiceServicer):
    def __init__(
        self,
        *,
        store: NotificationStore,
        catalog: Catalog,
        renderer: Renderer,
        provider: Provider,
        tasks: task_pb2_grpc.TaskServiceAsyncStub,
        sender: str,
        claim_lease: float = 30.0,
        credentials: Credentials = trusted_headers,
    ) -> None:
        self._store = store
        self._catalog = catalog
        self._renderer = renderer
        self._provider = provider
        self._tasks = tasks
        self._sender = sender
        self._claim_lease = claim_lease
        self._credentials = credentials
        self._deliveries = ShieldedTasks()

    async def drain(self) -> None:
        """Lets deliveries whose callers left finish (and record their outcome) at shutdown."""
        await self._deliveries.drain(self._claim_lease)

    def _render(
        self,
        template: str,
        locale: str,
        data: struct_pb2.Struct,
    ) -> RenderedEmail:
        spec = self._catalog.get(template)
        checked = spec.check(json_format.MessageToDict(data))
        return self._renderer.render(spec, resolve_locale(spec, locale), checked)

    async def ListTemplates(
        self, request: notify_pb2.ListTemplatesRequest, context: Context
    ) -> notify_pb2.ListTemplatesResponse:
        return notify_pb2.ListTemplatesResponse(
            templates=[spec.to_proto() for spec in self._catalog.templates.values()]
        )

    async def PreviewEmail(
        self, request: notify_pb2.PreviewEmailRequest, context: Context
    ) -> notify_pb2.PreviewEmailResponse:
        require_role(current_principal(), PREVIEW_ROLES, "PreviewEmail")
        rendered = self._render(request.template, request.locale, request.data)
        return notify_pb2.PreviewEmailResponse(
            subject=rendered.subject,
            html_body=rendered.html,
            text_body=rendered.text,
            locale=rendered.locale,
        )

    async def SendEmail(
        self, request: notify_pb2.SendEmailRequest, context: Context
    ) -> notify_pb2.SendEmailResponse:
        return notify_pb2.SendEmailResponse(
            notification=await self.send(current_principal(), request)
        )

    async def send(
        self, principal: Principal, request: notify_pb2.SendEmailRequest
    ) -> notify_pb2.Notification:
        """Checks, records and queues one email for ``principal`` (RPCs and webhooks)."""
        key = request.idempotency_key
        check_idempotency_key(key)
        self._catalog.get(request.template).check_sender(principal)
        recipients = check_all(request)
        rendered = self._render(request.template, request.locale, request.data)
        notification = notify_pb2.Notification(
            id=new_notification_id(),
            org_id=principal.org_id,
            template=request.template,
            locale=rendered.locale,
            recipients=recipients,
            status=QUEUED,
            idempotency_key=key,
        )
        notification.created_at.GetCurrentTime()
        notification.updated_at.CopyFrom(notification.created_at)
        stored, _ = await self._store.create(notification, request)
        if not stored.task_id:
            # New, or an earlier call recorded it but could not queue it: queue it now.
            stored = await self._enqueue(principal, stored)
        return stored

    async def _enqueue(
        self, principal: Principal, notification: notify_pb2.Notification
    ) -> notify_pb2.Notification:
        with downstream_errors("task service"):
            reply = await self._tasks.PublishEmailTask(
                task_pb2.PublishEmailTaskRequest(
                    payload=task_pb2.EmailTaskPayload(notification_id=notification.id),
                    idempotency_key=f"notification:{notification.id}",
                ),
                metadata=await self._credentials(principal),
                timeout=Deadline.QUEUE,
            )
        task_id = reply.task.id

        def record(current: notify_pb2.Notification) -> None:
            current.task_id = task_id

        return await self._store.change(notification.org_id, notification.id, record)

    async def GetNotification(
        self, request: notify_pb2.GetNotificationRequest, context: Context
    ) -> notify_pb2.GetNotificationResponse:
        notification, _ = await self._store.get(
            current_principal().org_id, _notification_id(request.notification_id)
        )
        return notify_pb2.GetNotificationResponse(notification=notification)

    async def DeliverNotification(
        self, request: notify_pb2.DeliverNotificationRequest, context: Context
    ) -> notify_pb2.DeliverNotificationResponse:
        principal = current_principal()
        require_role(principal, DELIVER_ROLES, "DeliverNotification")
        notification_id = _notification_id(request.notification_id)
        # The send and the record of its outcome finish even if the caller goes away.
        delivered = await self._deliveries.run(self._deliver(principal.org_id, notification_id))
        return notify_pb2.DeliverNotificationResponse(notification=delivered)

    async def _deliver(self, org: str, notification_id: str) -> notify_pb2.Notification:
        async with self._store.claimed(org, notification_id, lease=self._claim_lease):
            # Read under the claim: an earlier holder's outcome is recorded by now.
            notification, original = await self._store.get(org, notification_id)
            if notification.status == SENT:
                return notification
            if notification.status == FAILED:
                raise FailedPrecondition(
                    f"notification {notification.id} failed for good: {notification.last_error}",
                    reason=errors_pb2.ERROR_REASON_DELIVERY_FAILED,
                )
            rendered = self._render(original.template, original.locale, original.data)
            message, envelope = build_message(
                notification_id=notification.id,
                sender=self._sender,
                request=original,
                rendered=rendered,
            )
            await self._store.change(org, notification_id, _attempt_started)
            try:
                delivery = await self._provider.deliver(message, envelope)
            except DeliveryError as error:
                raise await self._record_failure(org, notification_id, error) from error
            return await self._store.change(
                org, notification_id, _sent(delivery, str(message["Message-ID"]))
            )

    async def _record_failure(
        self, org: str, notification_id: str, error: DeliveryError
    ) -> FailedPrecondition | DependencyUnavailable:
        failure, permanent = str(error), error.permanent

        def failed(current: notify_pb2.Notification) -> None:
            current.last_error = failure
            # Not SENDING any more: the server said no, so the next attempt is no resend.
            current.status = FAILED if permanent else QUEUED

        await self._store.change(org, notification_id, failed)
        if permanent:
            return FailedPrecondition(
                f"the mail server refused notification {notification_id}: {failure}",
                reason=errors_pb2.ERROR_REASON_DELIVERY_FAILED,
            )
        return DependencyUnavailable("mail server", failure)


def _attempt_started(current: notify_pb2.Notification) -> None:
    if current.status == SENDING:
        # An earlier attempt never recorded its outcome (notify_svc died mid-send): the mail
        # server may have accepted it. Resend with the same Message-ID, for the relay or
        # provider to deduplicate, and say so on the record.
        log.warning("notification %s: resending after an attempt with no outcome", current.id)
        current.possible_duplicate = True
    current.status = SENDING
    current.attempts += 1


def _sent(delivery: Delivery, message_id: str) -> Callable[[notify_pb2.Notification], None]:
    def sent(current: notify_pb2.Notification) -> None:
        current.status = SENT
        current.provider = delivery.provider
        current.message_id = message_id
        current.last_error = ""
        current.sent_at.GetCurrentTime()

    return sent
