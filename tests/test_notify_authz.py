"""Who may send what, and delivery that sends once: concurrency, cancellation, crashes.

The attacks of issue #13 are the attacker's requests through the real Envoy edge; the
delivery faults of issue #15 run against real SMTP (aiosmtpd), Redis and gRPC.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from email.message import EmailMessage
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis
import redis.exceptions
from grpc import aio

from devtools.servers import NatsServer, RedisServer, free_port
from identity_svc.keys import issue_access_token
from mesh.auth import AuthSettings
from mesh.context import Principal
from mesh.errors import PermissionDenied
from mesh.redisconn import RedisSettings, connect_redis
from mesh.settings import ServerSettings
from notify_svc.catalog import Catalog
from notify_svc.config import NotifySettings
from notify_svc.server import build_runner
from notify_svc.shielded import ShieldedTasks
from notify_svc.smtp import SmtpProvider, SmtpSettings
from notify_svc.store import NotificationStore
from notify_svc.webhooks import WebhookSettings
from opsmesh.notify.v1 import notify_pb2 as pb
from opsmesh.notify.v1 import notify_pb2_grpc
from tests.conftest import FAST_HEALTH
from tests.helpers import assert_eventually, error_details, identity
from tests.sendgrid_standin import API_KEY as SENDGRID_KEY
from tests.sendgrid_standin import SendGridStandIn
from tests.smtp_sink import Sink
from tests.test_edge import Edge, edge  # noqa: F401 - the real edge, used as a fixture
from tests.test_notify import INVITE, NotifyStack, notify_stack, struct

SERVICE = identity("task-worker", "acme", "service")
ADMIN = identity("ada", "acme", "admin")
USER = identity("mallory", "acme")
RESET = {"reset_url": "https://evil.example/reset", "expires_in_minutes": 30}
BILLING = {
    "org_name": "Acme",
    "amount": 49.0,
    "currency": "eur",
    "update_payment_url": "https://evil.example/pay",
}
SENT = pb.NOTIFICATION_STATUS_SENT


# --- Who may send what ---------------------------------------------------------------------


@pytest.fixture
async def notify_at_edge(edge: Edge, redis_server: RedisServer) -> AsyncIterator[Sink]:  # noqa: F811
    """notify_svc behind the edge, verifying tokens (jwt) like a deployment; no worker."""
    sink = Sink().start()
    runner, _ = build_runner(
        NotifySettings(
            server=ServerSettings(port=edge.ports["notify"], grace_period=1.0),
            redis=RedisSettings(url=redis_server.url),
            smtp=SmtpSettings(port=sink.port, timeout=2.0),
            task_address=f"127.0.0.1:{free_port()}",
            key_prefix=f"test:{uuid.uuid4().hex[:8]}:",
            auth=AuthSettings(mode="jwt", issuer=edge.issuer),
            webhooks=WebhookSettings(port=0),
        ),
        options=FAST_HEALTH,
    )
    await runner.start()
    try:
        yield sink
    finally:
        await runner.stop()
        sink.stop()


def bearer(edge: Edge, *roles: str) -> tuple[tuple[str, str], ...]:  # noqa: F811
    token = issue_access_token(
        edge.ring,
        Principal("mallory", "acme", frozenset(roles)),
        issuer=edge.issuer,
        audience="opsmesh",
        ttl=300,
    )
    return (("authorization", f"Bearer {token}"),)


async def refused_code(call: object) -> grpc.StatusCode:
    with pytest.raises(aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value.code()


async def test_a_signed_in_user_without_roles_cannot_send_platform_emails_at_the_edge(
    edge: Edge,  # noqa: F811
    notify_at_edge: Sink,
) -> None:
    victims = [pb.Recipient(address=f"victim{i}@example.com") for i in range(50)]
    async with aio.insecure_channel(edge.grpc_address) as channel:
        stub = notify_pb2_grpc.NotificationServiceStub(channel)
        for template, data in (
            ("password_reset", RESET),
            ("org_invitation", INVITE),
            ("billing_payment_failed", BILLING),
        ):
            with pytest.raises(aio.AioRpcError) as caught:
                await stub.SendEmail(
                    pb.SendEmailRequest(template=template, data=struct(**data), to=victims),
                    metadata=bearer(edge),
                    timeout=10,
                )
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, template
            assert error_details(caught.value)["ErrorInfo"].reason == "PERMISSION_DENIED"
    assert notify_at_edge.messages == []


async def test_previews_are_for_admins_and_delivery_is_not_routed_at_the_edge(
    edge: Edge,  # noqa: F811
    notify_at_edge: Sink,
) -> None:
    preview = pb.PreviewEmailRequest(template="org_invitation", data=struct(**INVITE))
    deliver = pb.DeliverNotificationRequest(notification_id=str(uuid.uuid4()))
    async with aio.insecure_channel(edge.grpc_address) as channel:
        stub = notify_pb2_grpc.NotificationServiceStub(channel)
        assert (
            await refused_code(stub.PreviewEmail(preview, metadata=bearer(edge), timeout=10))
            == grpc.StatusCode.PERMISSION_DENIED
        )
        shown = await stub.PreviewEmail(preview, metadata=bearer(edge, "admin"), timeout=10)
        assert shown.subject == "Ada invited you to Acme on opsmesh"
        # Worker-only: no token, not even one claiming the service role, reaches it from outside.
        for roles in ((), ("admin",), ("service",)):
            assert (
                await refused_code(
                    stub.DeliverNotification(deliver, metadata=bearer(edge, *roles), timeout=10)
                )
                == grpc.StatusCode.UNIMPLEMENTED
            )
    assert notify_at_edge.messages == []


def test_each_template_names_who_may_send_it() -> None:
    catalog = Catalog()

    def may(template: str, *roles: str) -> bool:
        try:
            catalog.get(template).check_sender(Principal("p", "acme", frozenset(roles)))
        except PermissionDenied:
            return False
        return True

    for template in catalog.templates:
        assert may(template, "service"), template
        assert not may(template), template
        assert not may(template, "operator"), template
    assert may("org_invitation", "admin")
    assert not may("password_reset", "admin")
    assert not may("password_changed", "admin")
    assert not may("workspace_provisioning_completed", "admin")
    assert may("billing_payment_failed", "webhook:billing")
    assert not may("billing_payment_failed", "admin")
    assert not may("billing_payment_failed", "webhook:alertmanager")
    assert may("alert_notification", "webhook:alertmanager")
    assert not may("alert_notification", "webhook:billing")


@pytest.mark.parametrize(
    ("senders", "problem"),
    [("", "names no senders"), ('senders = ["everyone"]\n', "unknown sender 'everyone'")],
)
def test_catalog_refuses_templates_without_a_known_sender(
    tmp_path: Path, senders: str, problem: str
) -> None:
    (tmp_path / "catalog.toml").write_text(f'[x]\ndescription = "x"\n{senders}variables = []\n')
    (tmp_path / "x" / "en").mkdir(parents=True)
    with pytest.raises(ValueError, match=problem):
        Catalog(tmp_path)


@pytest.fixture
async def quiet(redis_server: RedisServer, nats_server: NatsServer) -> AsyncIterator[NotifyStack]:
    """A notification service without a worker: the tests deliver by hand.

    A short claim lease, so a claim that is not renewed lapses within a test."""
    async with notify_stack(
        redis_server.url, nats_server.url, with_worker=False, claim_lease=0.6
    ) as stack:
        yield stack


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


async def test_refused_calls_store_and_send_nothing(
    quiet: NotifyStack, redis_client: aioredis.Redis
) -> None:
    invite = pb.SendEmailRequest(
        template="org_invitation",
        data=struct(**INVITE),
        to=[pb.Recipient(address="bob@example.com")],
        idempotency_key="k1",
    )
    assert (
        await refused_code(quiet.stub.SendEmail(invite, metadata=USER))
        == grpc.StatusCode.PERMISSION_DENIED
    )
    assert await redis_client.keys(f"{quiet.settings.key_prefix}*") == []
    assert (
        await refused_code(
            quiet.stub.PreviewEmail(
                pb.PreviewEmailRequest(template="password_reset", data=struct(**RESET)),
                metadata=USER,
            )
        )
        == grpc.StatusCode.PERMISSION_DENIED
    )
    queued = (await quiet.stub.SendEmail(invite, metadata=ADMIN)).notification
    # Only services deliver: not even an admin of the org.
    assert (
        await refused_code(deliver(quiet, queued.id, who=ADMIN))
        == grpc.StatusCode.PERMISSION_DENIED
    )
    assert quiet.sink.messages == []


# --- Delivery: once, whatever happens -----------------------------------------------------


async def queue_invitation(stack: NotifyStack, **recipients: list[pb.Recipient]) -> pb.Notification:
    request = pb.SendEmailRequest(
        template="org_invitation",
        data=struct(**INVITE),
        **(recipients or {"to": [pb.Recipient(address="bob@example.com")]}),
    )
    return (await stack.stub.SendEmail(request, metadata=ADMIN)).notification


def deliver(
    stack: NotifyStack, notification_id: str, *, who: tuple[tuple[str, str], ...] = SERVICE
) -> object:
    return stack.stub.DeliverNotification(
        pb.DeliverNotificationRequest(notification_id=notification_id), metadata=who, timeout=10
    )


async def record_of(stack: NotifyStack, notification_id: str) -> pb.Notification:
    reply = await stack.stub.GetNotification(
        pb.GetNotificationRequest(notification_id=notification_id), metadata=ADMIN
    )
    return reply.notification


async def accepted(sink: Sink, count: int) -> None:
    async def arrived() -> None:
        assert len(sink.messages) == count

    await assert_eventually(arrived, timeout=10, interval=0.01)


async def test_parallel_deliveries_of_one_notification_send_one_email(quiet: NotifyStack) -> None:
    quiet.sink.reply_delay = 1.2  # the claim (lease 0.6s) lives on only by being renewed
    queued = await queue_invitation(quiet)
    burst = asyncio.gather(*(deliver(quiet, queued.id) for _ in range(10)), return_exceptions=True)
    await accepted(quiet.sink, 1)
    await asyncio.sleep(0.8)  # past the lease: a late redelivery must still find the claim held
    late = await asyncio.gather(deliver(quiet, queued.id), return_exceptions=True)
    outcomes = [*await burst, *late]
    done = [o for o in outcomes if isinstance(o, pb.DeliverNotificationResponse)]
    refused = [o for o in outcomes if isinstance(o, aio.AioRpcError)]
    assert len(done) == 1, outcomes
    assert done[0].notification.status == SENT
    assert [e.code() for e in refused] == [grpc.StatusCode.ABORTED] * 10
    assert error_details(refused[0])["RetryInfo"].retry_delay.ToNanoseconds() > 0
    again = await deliver(quiet, queued.id)
    assert again.notification.attempts == 1  # type: ignore[attr-defined]
    assert len(quiet.sink.messages) == 1


async def test_duplicate_recipients_get_one_copy_each(quiet: NotifyStack) -> None:
    queued = await queue_invitation(
        quiet,
        to=[
            pb.Recipient(address="bob@example.com", name="Bob"),
            pb.Recipient(address="Bob@Example.COM"),
            pb.Recipient(address="carol@example.com"),
        ],
        cc=[pb.Recipient(address="bob@example.com"), pb.Recipient(address="dave@example.com")],
        bcc=[pb.Recipient(address="carol@example.com"), pb.Recipient(address="dave@example.com")],
    )
    addresses = ["bob@example.com", "carol@example.com", "dave@example.com"]
    assert [r.address for r in queued.recipients] == addresses
    await deliver(quiet, queued.id)
    ((message, envelope),) = quiet.sink.messages
    assert sorted(envelope) == addresses
    assert message["To"] == "Bob <bob@example.com>, carol@example.com"
    assert message["Cc"] == "dave@example.com"


async def test_a_delivery_cancelled_after_the_server_took_the_email_still_records_it(
    quiet: NotifyStack,
) -> None:
    quiet.sink.reply_delay = 0.5
    queued = await queue_invitation(quiet)
    call = deliver(quiet, queued.id)
    await accepted(quiet.sink, 1)
    call.cancel()  # type: ignore[attr-defined]  # the worker died: grpc cancels the RPC

    async def recorded() -> pb.Notification:
        current = await record_of(quiet, queued.id)
        assert current.status == SENT
        return current

    sent = await assert_eventually(recorded, timeout=10)
    assert not sent.possible_duplicate
    assert (await deliver(quiet, queued.id)).notification.attempts == 1  # type: ignore[attr-defined]
    assert len(quiet.sink.messages) == 1


async def test_shutdown_waits_for_deliveries_whose_caller_left(
    redis_server: RedisServer, nats_server: NatsServer, redis_client: aioredis.Redis
) -> None:
    async with notify_stack(redis_server.url, nats_server.url, with_worker=False) as stack:
        stack.sink.reply_delay = 1.5  # longer than the server's grace period (1s)
        queued = await queue_invitation(stack)
        call = deliver(stack, queued.id)
        await accepted(stack.sink, 1)
        call.cancel()  # type: ignore[attr-defined]
        await stack.runner.stop()
        store = NotificationStore(
            redis_client, key_prefix=stack.settings.key_prefix, retention_ms=60_000
        )
        recorded, _ = await store.get("acme", queued.id)
    assert recorded.status == SENT


def lose_the_outcome(current: pb.Notification) -> None:
    """The record as notify_svc leaves it when it dies mid-send."""
    current.status = pb.NOTIFICATION_STATUS_SENDING
    current.attempts = 1


async def test_a_send_whose_outcome_was_lost_is_resent_with_the_same_message_id(
    quiet: NotifyStack, redis_client: aioredis.Redis
) -> None:
    queued = await queue_invitation(quiet)
    store = NotificationStore(redis_client, key_prefix=quiet.settings.key_prefix, retention_ms=1)
    await store.change("acme", queued.id, lose_the_outcome)
    resent = (await deliver(quiet, queued.id)).notification  # type: ignore[attr-defined]
    assert (resent.status, resent.attempts, resent.possible_duplicate) == (SENT, 2, True)
    ((message, _),) = quiet.sink.messages
    assert message["Message-ID"] == resent.message_id == f"<{queued.id}@opsmesh>"


async def test_a_transient_failure_is_no_possible_duplicate(quiet: NotifyStack) -> None:
    quiet.sink.defer_next = 1
    queued = await queue_invitation(quiet)
    assert await refused_code(deliver(quiet, queued.id)) == grpc.StatusCode.UNAVAILABLE
    waiting = await record_of(quiet, queued.id)
    assert waiting.status == pb.NOTIFICATION_STATUS_QUEUED
    assert "451" in waiting.last_error
    sent = (await deliver(quiet, queued.id)).notification  # type: ignore[attr-defined]
    assert (sent.status, sent.attempts, sent.possible_duplicate) == (SENT, 2, False)


async def test_sendgrid_recognizes_a_resend_by_its_idempotency_key(
    redis_server: RedisServer, nats_server: NatsServer, redis_client: aioredis.Redis
) -> None:
    sendgrid = SendGridStandIn().start()
    try:
        async with notify_stack(
            redis_server.url,
            nats_server.url,
            with_worker=False,
            provider="sendgrid",
            sendgrid_api_key=SENDGRID_KEY,
            sendgrid_url=sendgrid.url,
        ) as stack:
            queued = await queue_invitation(stack)
            await deliver(stack, queued.id)
            # SendGrid took it, but notify_svc died before recording that.
            store = NotificationStore(
                redis_client, key_prefix=stack.settings.key_prefix, retention_ms=60_000
            )
            await store.change("acme", queued.id, lose_the_outcome)
            resent = (await deliver(stack, queued.id)).notification  # type: ignore[attr-defined]
    finally:
        sendgrid.stop()
    assert (resent.status, resent.possible_duplicate) == (SENT, True)
    (mail,) = sendgrid.mails
    assert sendgrid.repeats == 1
    assert mail["custom_args"] == {"message_id": f"<{queued.id}@opsmesh>"}


# --- The SMTP pool under cancellation -----------------------------------------------------


async def test_cancelled_sends_do_not_leak_smtp_connections() -> None:
    sink = Sink().start()
    sink.reply_delay = 5.0
    provider = SmtpProvider(SmtpSettings(port=sink.port, timeout=10.0, pool_size=4))
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = "a@opsmesh.test", "b@example.com", "x"
    message.set_content("x")
    try:
        for batch in range(3):
            sends = [
                asyncio.create_task(provider.send(message, ["b@example.com"])) for _ in range(4)
            ]
            await accepted(sink, 4 * (batch + 1))
            for send in sends:
                send.cancel()
            await asyncio.gather(*sends, return_exceptions=True)

        async def all_closed() -> None:
            assert sink.established() == 0

        await assert_eventually(all_closed, timeout=10)
        sink.reply_delay = 0
        assert (await provider.send(message, ["b@example.com"])).startswith("2.0.0")
        assert sink.established() == 1, "a finished send returns its connection to the pool"
    finally:
        await provider.close()
        sink.stop()


async def test_shutdown_cancels_shielded_work_that_outlives_its_budget() -> None:
    shielded = ShieldedTasks()
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    caller = asyncio.create_task(shielded.run(forever()))
    await started.wait()
    caller.cancel()
    await asyncio.gather(caller, return_exceptions=True)
    assert shielded.running == 1, "the caller leaving does not stop the work"
    await shielded.drain(0.05)
    assert shielded.running == 0
    await shielded.drain(0.05)  # nothing left: returns at once


# --- Claims when Redis misbehaves ---------------------------------------------------------


async def test_a_claim_taken_over_or_unreachable_is_logged_not_fatal(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    client = connect_redis(RedisSettings(url=own_redis.url, socket_timeout=0.3))
    store = NotificationStore(client, key_prefix="claims:", retention_ms=60_000)
    try:
        async with store.claimed("acme", "n1", lease=0.15):
            # Someone else's claim replaced ours (ours lapsed while Redis was unreachable).
            await client.set("claims:claim:4:acme:n1", "another-holder")

            async def noticed() -> None:
                assert "lost the delivery claim" in caplog.text

            await assert_eventually(noticed, timeout=5)
        assert await client.get("claims:claim:4:acme:n1") == b"another-holder"
        async with store.claimed("acme", "n2", lease=0.15):
            own_redis.stop()

            async def renewal_failed() -> None:
                assert "could not renew the delivery claim" in caplog.text

            await assert_eventually(renewal_failed, timeout=5)
        assert "could not release the delivery claim" in caplog.text
    finally:
        await client.aclose()


async def test_a_claim_is_let_go_even_when_its_renewal_swallows_the_cancel(
    own_redis: RedisServer,
) -> None:
    # Python 3.11: a cancel landing as redis-py's socket timeout expires surfaces as a
    # TimeoutError. The renewal must still stop, or the claim lives (and refuses) forever.
    client = connect_redis(RedisSettings(url=own_redis.url))
    store = NotificationStore(client, key_prefix="swallow:", retention_ms=60_000)
    renewing = asyncio.Event()

    async def renew_swallowing_the_cancel(**_: object) -> int:
        renewing.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise redis.exceptions.TimeoutError("Timeout reading from socket") from None
        return 1

    store._renew = renew_swallowing_the_cancel  # type: ignore[method-assign,assignment]
    try:
        async with asyncio.timeout(5):
            async with store.claimed("acme", "n1", lease=0.06):
                await renewing.wait()
        assert await client.get("swallow:claim:4:acme:n1") is None
    finally:
        await client.aclose()
