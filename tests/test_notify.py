"""NotificationService: templates, previews, and delivery end to end over real SMTP."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import struct_pb2
from grpc import aio

from devtools.servers import NatsServer, RedisServer, free_port
from mesh.redisconn import RedisSettings
from mesh.server import ServiceRunner
from mesh.settings import ServerSettings, SettingsError
from notify_svc.catalog import TYPES, Catalog
from notify_svc.config import NotifySettings
from notify_svc.server import build_runner
from notify_svc.smtp import SmtpSettings
from notify_svc.webhooks import SIGNATURE_HEADER, Webhooks, WebhookSettings, billing_signature
from opsmesh.notify.v1 import notify_pb2 as pb
from opsmesh.notify.v1 import notify_pb2_grpc
from opsmesh.task.v1 import task_pb2 as task_pb
from task_svc.delivery import ProvisioningEmails, email_handler
from task_svc.workspace import KubeClient, KubeSettings, workspace_handler
from tests.conftest import FAST_HEALTH
from tests.helpers import assert_eventually, error_details, identity
from tests.kube_standin import KubeStandIn
from tests.sendgrid_standin import API_KEY as SENDGRID_KEY
from tests.sendgrid_standin import SendGridStandIn
from tests.smtp_sink import Sink
from tests.taskkit import TaskStack, running_worker, task_stack

# An org admin (may send invitations and preview) and a service (may send every template).
ALICE = identity("alice", "acme", "admin")
SERVICE = identity("mailer", "acme", "service")
EVE = identity("eve", "evilcorp")
SAMPLE = {
    "string": "Acme & Sons",
    "number": 1234.5,
    "boolean": True,
    "url": "https://opsmesh.example/x?a=1&b=2",
    "timestamp": "2026-12-01T10:00:00Z",
    "email": "ops@example.com",
    "list": ["env=prod", "team=core"],
}


def struct(**values: object) -> struct_pb2.Struct:
    result = struct_pb2.Struct()
    result.update(values)
    return result


INVITE = {"org_name": "Acme", "inviter_name": "Ada", "accept_url": "https://opsmesh.example/join/1"}


@dataclass
class NotifyStack:
    stub: notify_pb2_grpc.NotificationServiceStub
    runner: ServiceRunner
    sink: Sink
    webhooks: Webhooks
    tasks: TaskStack
    channel: aio.Channel
    settings: NotifySettings


@asynccontextmanager
async def notify_stack(
    redis_url: str, nats_url: str, *, with_worker: bool = True, **overrides: Any
) -> AsyncIterator[NotifyStack]:
    sink = Sink().start()
    async with task_stack(nats_url, max_attempts=4) as tasks:
        settings = NotifySettings(
            server=ServerSettings(port=0, grace_period=1.0),
            redis=RedisSettings(url=redis_url),
            smtp=SmtpSettings(port=sink.port, timeout=2.0, sender="opsmesh <noreply@opsmesh.test>"),
            task_address=f"127.0.0.1:{tasks.runner.port}",
            **{
                "key_prefix": f"test:{uuid.uuid4().hex[:8]}:",
                "webhooks": WebhookSettings(port=0),
                **overrides,
            },
        )
        runner, webhooks = build_runner(settings, options=FAST_HEALTH)
        await runner.start()
        channel = aio.insecure_channel(f"127.0.0.1:{runner.port}")
        try:
            stub = notify_pb2_grpc.NotificationServiceStub(channel)
            if with_worker:
                async with running_worker(tasks, email_handler(channel), max_attempts=4):
                    yield NotifyStack(stub, runner, sink, webhooks, tasks, channel, settings)
            else:
                yield NotifyStack(stub, runner, sink, webhooks, tasks, channel, settings)
        finally:
            await channel.close()
            await runner.stop()
            sink.stop()


@pytest.fixture
async def notify(redis_server: RedisServer, nats_server: NatsServer) -> AsyncIterator[NotifyStack]:
    async with notify_stack(redis_server.url, nats_server.url) as stack:
        yield stack


async def test_every_template_renders_html_and_text_in_every_locale(notify) -> None:
    listed = (await notify.stub.ListTemplates(pb.ListTemplatesRequest(), metadata=ALICE)).templates
    assert {t.id for t in listed} == {
        "org_invitation",
        "workspace_provisioning_started",
        "workspace_provisioning_completed",
        "workspace_provisioning_failed",
        "billing_subscription_created",
        "billing_subscription_changed",
        "billing_payment_succeeded",
        "billing_payment_failed",
        "billing_invoice_available",
        "password_reset",
        "password_changed",
        "alert_notification",
    }
    names = {
        v.name: v.type for v in next(t for t in listed if t.id == "alert_notification").variables
    }
    assert names["labels"] == pb.VARIABLE_TYPE_LIST
    types = {v: k for k, v in TYPES.items()}
    for template in listed:
        full = {v.name: SAMPLE[types[v.type]] for v in template.variables}
        minimal = {v.name: SAMPLE[types[v.type]] for v in template.variables if v.required}
        for locale in template.locales:
            for data in (full, minimal):
                preview = await notify.stub.PreviewEmail(
                    pb.PreviewEmailRequest(
                        template=template.id, locale=locale, data=struct(**data)
                    ),
                    metadata=ALICE,
                )
                assert preview.subject
                assert "\n" not in preview.subject
                assert preview.html_body.startswith("<!DOCTYPE html>")
                assert "Acme &amp; Sons" in preview.html_body or "Acme" not in str(data)
                assert preview.text_body.strip()
                assert preview.locale == locale


async def test_locale_falls_back_to_the_language_then_english(notify) -> None:
    async def locale_of(requested: str) -> str:
        preview = await notify.stub.PreviewEmail(
            pb.PreviewEmailRequest(
                template="org_invitation", locale=requested, data=struct(**INVITE)
            ),
            metadata=ALICE,
        )
        return preview.locale

    assert await locale_of("de-AT") == "de"
    assert await locale_of("fr-FR") == "en"
    assert await locale_of("") == "en"


async def test_values_cannot_inject_html_or_headers(notify) -> None:
    preview = await notify.stub.PreviewEmail(
        pb.PreviewEmailRequest(
            template="org_invitation",
            data=struct(
                org_name="<script>alert(1)</script>",
                inviter_name="Ada\r\nBcc: victim@example.com",
                accept_url="https://opsmesh.example/join",
            ),
        ),
        metadata=ALICE,
    )
    assert "<script>" not in preview.html_body
    assert "&lt;script&gt;" in preview.html_body
    assert "\r" not in preview.subject
    assert "\n" not in preview.subject


@pytest.mark.parametrize(
    ("template", "data", "code", "field"),
    [
        (
            "org_invitation",
            {"org_name": "Acme", "inviter_name": "Ada"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "data.accept_url",
        ),
        (
            "org_invitation",
            {**INVITE, "accept_url": "javascript:alert(1)"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "data.accept_url",
        ),
        (
            "org_invitation",
            {**INVITE, "expires_at": "next week"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "data.expires_at",
        ),
        (
            "org_invitation",
            {**INVITE, "orgname": "typo"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "data.orgname",
        ),
        (
            "billing_payment_failed",
            {
                "org_name": "A",
                "amount": "ten",
                "currency": "EUR",
                "update_payment_url": "https://x.example",
            },
            grpc.StatusCode.INVALID_ARGUMENT,
            "data.amount",
        ),
        ("no_such_template", {}, grpc.StatusCode.NOT_FOUND, None),
    ],
)
async def test_bad_template_data_is_rejected_before_anything_is_queued(
    notify, template, data, code, field
) -> None:
    for call in (
        notify.stub.PreviewEmail(
            pb.PreviewEmailRequest(template=template, data=struct(**data)), metadata=SERVICE
        ),
        notify.stub.SendEmail(
            pb.SendEmailRequest(
                template=template, data=struct(**data), to=[pb.Recipient(address="a@example.com")]
            ),
            metadata=SERVICE,
        ),
    ):
        with pytest.raises(aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == code
        if field:
            assert error_details(caught.value)["BadRequest"].field_violations[0].field == field
    assert notify.sink.messages == []


@pytest.mark.parametrize(
    ("recipients", "field"),
    [
        ({"to": []}, "to"),
        ({"to": [pb.Recipient(address="a@example.com\r\nBcc: x@evil.example")]}, "to[0]"),
        ({"to": [pb.Recipient(address="a@example.com", name="Ada\nBcc: x@evil.example")]}, "to[0]"),
        ({"to": [pb.Recipient(address="not-an-address")]}, "to[0].address"),
        ({"to": [pb.Recipient(address=f"u{i}@example.com") for i in range(51)]}, "to"),
    ],
)
async def test_recipients_are_checked_like_an_attacker_would_try_them(
    notify, recipients, field
) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await notify.stub.SendEmail(
            pb.SendEmailRequest(template="org_invitation", data=struct(**INVITE), **recipients),
            metadata=ALICE,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(caught.value)["BadRequest"].field_violations[0].field == field


async def delivered_for_good(notify: NotifyStack, notification: pb.Notification, who=ALICE) -> None:
    """Waits until the notification's delivery task is final. Its outcome is recorded before its
    message is acknowledged and a redelivery of a final task sends nothing, so from here on the
    sink's count cannot change: no sleeping in the hope that a duplicate would show up."""
    request = task_pb.GetTaskRequest(task_id=notification.task_id)

    async def final() -> None:
        task = (await notify.tasks.stub.GetTask(request, metadata=who)).task
        assert task.status == task_pb.TASK_STATUS_SUCCEEDED, task_pb.TaskStatus.Name(task.status)

    await assert_eventually(final, timeout=20)


async def wait_notification(
    notify: NotifyStack, notification_id: str, status: int, who=ALICE
) -> pb.Notification:
    async def reached() -> pb.Notification:
        current = (
            await notify.stub.GetNotification(
                pb.GetNotificationRequest(notification_id=notification_id), metadata=who
            )
        ).notification
        assert current.status == status, (
            pb.NotificationStatus.Name(current.status),
            current.last_error,
        )
        return current

    return await assert_eventually(reached, timeout=20)


async def test_invitation_is_delivered_once_with_both_parts(notify) -> None:
    request = pb.SendEmailRequest(
        template="org_invitation",
        data=struct(**INVITE),
        to=[pb.Recipient(address="Bob@Example.com", name="Bob")],
        bcc=[pb.Recipient(address="audit@example.com")],
        idempotency_key="invite-bob",
    )
    first = (await notify.stub.SendEmail(request, metadata=ALICE)).notification
    again = (await notify.stub.SendEmail(request, metadata=ALICE)).notification
    assert again.id == first.id
    assert first.status == pb.NOTIFICATION_STATUS_QUEUED
    assert first.task_id
    sent = await wait_notification(notify, first.id, pb.NOTIFICATION_STATUS_SENT)
    assert sent.attempts == 1
    assert sent.provider == "smtp"
    assert sent.message_id == f"<{first.id}@opsmesh>"
    await delivered_for_good(notify, sent)
    assert len(notify.sink.messages) == 1
    message, envelope = notify.sink.messages[0]
    assert sorted(envelope) == ["Bob@example.com", "audit@example.com"]
    assert message["Subject"] == "Ada invited you to Acme on opsmesh"
    assert "audit@example.com" not in str(message), "bcc stays out of the headers"
    parts = {part.get_content_type(): part.get_content() for part in message.iter_parts()}
    assert "https://opsmesh.example/join/1" in parts["text/plain"]
    assert 'href="https://opsmesh.example/join/1"' in parts["text/html"]
    with pytest.raises(aio.AioRpcError) as caught:
        await notify.stub.GetNotification(
            pb.GetNotificationRequest(notification_id=first.id), metadata=EVE
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(aio.AioRpcError) as caught:
        await notify.stub.GetNotification(
            pb.GetNotificationRequest(notification_id="../../etc"), metadata=ALICE
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_smtp_outage_is_retried_and_delivered_once_it_is_back(notify) -> None:
    notify.sink.defer_next = 2  # two 451 replies, then accept
    sent_one = (
        await notify.stub.SendEmail(
            pb.SendEmailRequest(
                template="password_reset",
                locale="de",
                data=struct(reset_url="https://opsmesh.example/reset/1", expires_in_minutes=30),
                to=[pb.Recipient(address="carol@example.com")],
            ),
            metadata=SERVICE,
        )
    ).notification
    done = await wait_notification(notify, sent_one.id, pb.NOTIFICATION_STATUS_SENT)
    assert done.attempts == 3
    assert len(notify.sink.messages) == 1
    assert notify.sink.messages[0][0]["Subject"] == "Setzen Sie Ihr opsmesh-Passwort zurück"

    port = notify.sink.port
    notify.sink.stop()
    down = (
        await notify.stub.SendEmail(
            pb.SendEmailRequest(
                template="org_invitation",
                data=struct(**INVITE),
                to=[pb.Recipient(address="dave@example.com")],
            ),
            metadata=ALICE,
        )
    ).notification

    async def tried() -> None:
        current = (
            await notify.stub.GetNotification(
                pb.GetNotificationRequest(notification_id=down.id), metadata=ALICE
            )
        ).notification
        assert current.attempts >= 1
        assert "unreachable" in current.last_error

    await assert_eventually(tried, timeout=10)
    notify.sink.port = port
    notify.sink.start()
    await wait_notification(notify, down.id, pb.NOTIFICATION_STATUS_SENT)
    assert [m["To"] for m, _ in notify.sink.messages][-1] == "dave@example.com"
    assert len(notify.sink.messages) == 2


async def test_a_refused_recipient_fails_at_once_with_the_servers_reply(notify) -> None:
    notify.sink.reject.add("ghost@example.com")
    failing = (
        await notify.stub.SendEmail(
            pb.SendEmailRequest(
                template="org_invitation",
                data=struct(**INVITE),
                to=[pb.Recipient(address="ghost@example.com")],
            ),
            metadata=ALICE,
        )
    ).notification
    failed = await wait_notification(notify, failing.id, pb.NOTIFICATION_STATUS_FAILED)
    assert failed.attempts == 1
    assert "550 5.1.1" in failed.last_error
    assert notify.sink.messages == []


def test_catalog_refuses_a_template_without_english(tmp_path) -> None:
    (tmp_path / "catalog.toml").write_text('[x]\ndescription = "x"\nvariables = []\n')
    (tmp_path / "x" / "de").mkdir(parents=True)
    with pytest.raises(ValueError, match="no en variant"):
        Catalog(tmp_path)


@pytest.fixture
def sendgrid():
    standin = SendGridStandIn().start()
    yield standin
    standin.stop()


async def test_sendgrid_takes_over_when_smtp_fails_transiently(
    redis_server: RedisServer, nats_server: NatsServer, sendgrid: SendGridStandIn
) -> None:
    async with notify_stack(
        redis_server.url,
        nats_server.url,
        fallback="sendgrid",
        sendgrid_api_key=SENDGRID_KEY,
        sendgrid_url=sendgrid.url,
    ) as notify:
        notify.sink.stop()  # SMTP is down: the fallback delivers
        queued = (
            await notify.stub.SendEmail(
                pb.SendEmailRequest(
                    template="org_invitation",
                    data=struct(**INVITE),
                    to=[pb.Recipient(address="erin@example.com", name="Erin")],
                    cc=[pb.Recipient(address="cc@example.com")],
                    bcc=[pb.Recipient(address="audit@example.com")],
                ),
                metadata=ALICE,
            )
        ).notification
        sent = await wait_notification(notify, queued.id, pb.NOTIFICATION_STATUS_SENT)
    assert sent.provider == "sendgrid"
    (mail,) = sendgrid.mails
    personalization = mail["personalizations"][0]
    assert personalization["to"] == [{"email": "erin@example.com", "name": "Erin"}]
    assert personalization["cc"] == [{"email": "cc@example.com"}]
    assert personalization["bcc"] == [{"email": "audit@example.com"}]
    assert mail["subject"] == "Ada invited you to Acme on opsmesh"
    assert [c["type"] for c in mail["content"]] == ["text/plain", "text/html"]


async def test_sendgrid_rejection_is_permanent_and_5xx_is_retried(
    redis_server: RedisServer, nats_server: NatsServer, sendgrid: SendGridStandIn
) -> None:
    async with notify_stack(
        redis_server.url,
        nats_server.url,
        provider="sendgrid",
        sendgrid_api_key=SENDGRID_KEY,
        sendgrid_url=sendgrid.url,
    ) as notify:
        sendgrid.fail_next[:] = [(503, "try later")]
        retried = (
            await notify.stub.SendEmail(
                pb.SendEmailRequest(
                    template="org_invitation",
                    data=struct(**INVITE),
                    to=[pb.Recipient(address="f@example.com")],
                ),
                metadata=ALICE,
            )
        ).notification
        assert (
            await wait_notification(notify, retried.id, pb.NOTIFICATION_STATUS_SENT)
        ).attempts == 2
        sendgrid.fail_next[:] = [
            (400, "The from address does not match a verified Sender Identity")
        ]
        refused = (
            await notify.stub.SendEmail(
                pb.SendEmailRequest(
                    template="org_invitation",
                    data=struct(**INVITE),
                    to=[pb.Recipient(address="g@example.com")],
                ),
                metadata=ALICE,
            )
        ).notification
        failed = await wait_notification(notify, refused.id, pb.NOTIFICATION_STATUS_FAILED)
    assert failed.attempts == 1
    assert "SendGrid 400" in failed.last_error
    assert "verified Sender Identity" in failed.last_error


def test_mail_provider_settings_are_checked() -> None:
    with pytest.raises(SettingsError, match="OPSMESH_SENDGRID_API_KEY is required"):
        NotifySettings.from_env({"OPSMESH_MAIL_PROVIDER": "sendgrid"})
    with pytest.raises(SettingsError, match="must differ"):
        NotifySettings.from_env({"OPSMESH_MAIL_FALLBACK": "smtp"})
    settings = NotifySettings.from_env(
        {
            "OPSMESH_MAIL_FALLBACK": "sendgrid",
            "OPSMESH_SENDGRID_API_KEY": "k",
            "OPSMESH_SMTP_PORT": "25",
        }
    )
    assert (settings.provider, settings.fallback, settings.smtp.port) == ("smtp", "sendgrid", 25)


BILLING_SECRET = "whsec_test"


@pytest.fixture
async def hooked(redis_server: RedisServer, nats_server: NatsServer) -> AsyncIterator[NotifyStack]:
    hooks = WebhookSettings(
        port=free_port(),
        billing_secret=BILLING_SECRET,
        alert_token="am-token",
        alert_org="acme",
        alert_emails=("oncall@example.com",),
    )
    async with notify_stack(redis_server.url, nats_server.url, webhooks=hooks) as stack:
        yield stack


def billing_event(event_id: str = "evt_1") -> bytes:
    return json.dumps(
        {
            "id": event_id,
            "type": "payment.failed",
            "org_id": "acme",
            "recipients": ["billing@acme.example"],
            "data": {
                "org_name": "Acme",
                "amount": 49.0,
                "currency": "eur",
                "update_payment_url": "https://opsmesh.example/billing",
            },
        }
    ).encode()


async def post(
    stack: NotifyStack, path: str, body: bytes, headers: dict[str, str]
) -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{stack.webhooks.port}") as client:
        return await client.post(path, content=body, headers=headers)


async def test_signed_billing_event_sends_one_email_even_when_replayed(hooked) -> None:
    body = billing_event("evt_replay")
    signed = {SIGNATURE_HEADER: billing_signature(BILLING_SECRET, int(time.time()), body)}
    first = await post(hooked, "/webhooks/billing", body, signed)
    assert first.status_code == 202, first.text
    again = await post(hooked, "/webhooks/billing", body, signed)
    assert again.json() == first.json(), "the same event is the same notification"
    (notification_id,) = first.json()["notification_ids"]
    sent = await wait_notification(hooked, notification_id, pb.NOTIFICATION_STATUS_SENT)
    await delivered_for_good(hooked, sent, who=identity("billing-webhook", sent.org_id))
    assert len(hooked.sink.messages) == 1
    assert hooked.sink.messages[0][0]["Subject"] == "Payment of 49.00 EUR failed"


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({SIGNATURE_HEADER: "t=abc,v1=00"}, 401),
        (
            {
                SIGNATURE_HEADER: billing_signature(
                    "wrong-secret", int(time.time()), billing_event()
                )
            },
            401,
        ),
        ({SIGNATURE_HEADER: billing_signature(BILLING_SECRET, int(time.time()), b"{}")}, 401),
        (
            {
                SIGNATURE_HEADER: billing_signature(
                    BILLING_SECRET, int(time.time()) - 3600, billing_event()
                )
            },
            400,
        ),
    ],
    ids=["unsigned", "malformed", "other-secret", "tampered-body", "old-timestamp"],
)
async def test_billing_webhook_refuses_what_it_cannot_trust(hooked, headers, status) -> None:
    response = await post(hooked, "/webhooks/billing", billing_event(), headers)
    assert response.status_code == status, response.text
    assert hooked.sink.messages == []


async def test_billing_webhook_rejects_bad_events_clearly(hooked) -> None:
    def signed(body: bytes) -> dict[str, str]:
        return {SIGNATURE_HEADER: billing_signature(BILLING_SECRET, int(time.time()), body)}

    unknown = json.dumps(
        {"id": "e", "type": "refund.created", "org_id": "acme", "recipients": []}
    ).encode()
    assert (await post(hooked, "/webhooks/billing", unknown, signed(unknown))).status_code == 400
    bad_data = json.dumps(
        {
            "id": "e2",
            "type": "payment.failed",
            "org_id": "acme",
            "recipients": ["b@acme.example"],
            "data": {"org_name": "A"},
        }
    ).encode()
    response = await post(hooked, "/webhooks/billing", bad_data, signed(bad_data))
    assert response.status_code == 422
    assert "needs amount" in response.json()["error"]


async def test_alertmanager_firing_alerts_become_alert_emails(hooked) -> None:
    payload = json.dumps(
        {
            "version": "4",
            "status": "firing",
            "receiver": "opsmesh",
            "alerts": [
                {
                    "status": "firing",
                    "fingerprint": "abc123",
                    "startsAt": "2026-11-25T10:00:00Z",
                    "generatorURL": "http://prometheus.local/graph?g0.expr=up",
                    "labels": {
                        "alertname": "HighErrorRate",
                        "severity": "critical",
                        "service": "api",
                    },
                    "annotations": {
                        "summary": "5xx above 5% for 10m",
                        "description": "api is failing",
                    },
                },
                {
                    "status": "resolved",
                    "fingerprint": "old",
                    "labels": {"alertname": "Old"},
                    "annotations": {},
                },
            ],
        }
    ).encode()
    refused = await post(
        hooked, "/webhooks/alertmanager", payload, {"Authorization": "Bearer nope"}
    )
    assert refused.status_code == 401
    accepted = await post(
        hooked, "/webhooks/alertmanager", payload, {"Authorization": "Bearer am-token"}
    )
    assert accepted.status_code == 202, accepted.text
    (notification_id,) = accepted.json()["notification_ids"]
    await wait_notification(hooked, notification_id, pb.NOTIFICATION_STATUS_SENT)
    message, recipients = hooked.sink.messages[0]
    assert recipients == ["oncall@example.com"]
    assert message["Subject"] == "[CRITICAL] HighErrorRate: 5xx above 5% for 10m"
    assert "service=api" in message.get_body(("plain",)).get_content()


async def test_workspace_tasks_send_provisioning_emails(notify) -> None:
    kube = KubeStandIn().start()
    client = KubeClient(KubeSettings(api=kube.url))
    handler = workspace_handler(client, ProvisioningEmails(notify.channel))
    try:
        async with running_worker(
            notify.tasks, handler, types=(task_pb.TASK_TYPE_WORKSPACE,), worker_id="ws"
        ):
            task = (
                await notify.tasks.stub.PublishWorkspaceTask(
                    task_pb.PublishWorkspaceTaskRequest(
                        payload=task_pb.WorkspaceTaskPayload(
                            action=task_pb.WORKSPACE_ACTION_PROVISION,
                            workspace="team-a",
                            notify_emails=["owner@example.com"],
                        )
                    ),
                    metadata=ALICE,
                )
            ).task

            async def both_sent() -> None:
                subjects = sorted(m["Subject"] for m, _ in notify.sink.messages)
                assert subjects == ["Setting up workspace team-a", "Workspace team-a is ready"]

            await assert_eventually(both_sent, timeout=20)
            kube.fail_next[:] = [(403, "namespaces is forbidden")]
            refused = (
                await notify.tasks.stub.PublishWorkspaceTask(
                    task_pb.PublishWorkspaceTaskRequest(
                        payload=task_pb.WorkspaceTaskPayload(
                            action=task_pb.WORKSPACE_ACTION_PROVISION,
                            workspace="team-b",
                            notify_emails=["owner@example.com"],
                        )
                    ),
                    metadata=ALICE,
                )
            ).task

            async def failure_sent() -> None:
                subjects = [m["Subject"] for m, _ in notify.sink.messages]
                assert "Workspace team-b could not be set up" in subjects

            await assert_eventually(failure_sent, timeout=20)
        assert task.id != refused.id
        failed_mail = next(m for m, _ in notify.sink.messages if "team-b could not" in m["Subject"])
        assert "namespaces is forbidden" in failed_mail.get_body(("plain",)).get_content()
    finally:
        await client.close()
        kube.stop()
