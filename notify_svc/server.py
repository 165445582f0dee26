"""Wires the notification service: settings → Redis, SMTP, task service → gRPC server."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from grpc import aio

from mesh.auth import Authenticator, authenticator_for
from mesh.clients import service_credentials
from mesh.health import Probe
from mesh.logs import configure_service_logging
from mesh.redisconn import connect_redis
from mesh.revocations import RevocationFeed
from mesh.server import Registration, RunnerOptions, ServiceRunner, run_main
from notify_svc.catalog import Catalog
from notify_svc.config import NotifySettings
from notify_svc.providers import Provider, SendGrid, Smtp, WithFallback
from notify_svc.rendering import Renderer
from notify_svc.service import SERVICE_NAME, NotificationService
from notify_svc.smtp import SmtpProvider
from notify_svc.store import NotificationStore
from notify_svc.webhooks import Webhooks
from opsmesh.notify.v1 import notify_pb2_grpc
from opsmesh.task.v1 import task_pb2_grpc


def _provider(name: str, settings: NotifySettings) -> Provider:
    if name == "sendgrid":
        return SendGrid(api_key=settings.sendgrid_api_key, base_url=settings.sendgrid_url)
    return Smtp(SmtpProvider(settings.smtp))


def providers_for(settings: NotifySettings) -> Provider:
    """The configured provider, wrapped with its fallback when there is one."""
    primary = _provider(settings.provider, settings)
    if not settings.fallback:
        return primary
    return WithFallback(primary, _provider(settings.fallback, settings))


def build_runner(
    settings: NotifySettings,
    *,
    authenticator: Authenticator | None = None,
    options: RunnerOptions | None = None,
) -> tuple[ServiceRunner, Webhooks]:
    client = connect_redis(settings.redis)
    revocations = RevocationFeed.open(settings.auth.revocation_feed_url, default=client)
    store = NotificationStore(
        client, key_prefix=settings.key_prefix, retention_ms=int(settings.retention * 1000)
    )
    provider = providers_for(settings)
    task_channel = aio.insecure_channel(settings.task_address)
    credentials, close_credentials = service_credentials(settings.service_client)
    service = NotificationService(
        store=store,
        catalog=Catalog(),
        renderer=Renderer(),
        provider=provider,
        tasks=task_pb2_grpc.TaskServiceStub(task_channel),
        sender=settings.smtp.sender,
        claim_lease=settings.claim_lease,
        credentials=credentials,
    )

    # The webhook server listens where the gRPC server does (one OPSMESH_HOST per process).
    webhooks = Webhooks(replace(settings.webhooks, host=settings.server.host), service.send)

    async def redis_answers() -> None:
        await client.ping()

    async def close_task_channel() -> None:
        await task_channel.close(None)

    base = options or RunnerOptions()
    runner = ServiceRunner(
        settings=settings.server,
        registrations=[
            Registration.of(
                SERVICE_NAME, service, notify_pb2_grpc.add_NotificationServiceServicer_to_server
            )
        ],
        authenticator=authenticator or authenticator_for(settings.auth, revocations=revocations),
        probes=[Probe(name="redis", check=redis_answers)],
        options=base.extended(
            on_start=(webhooks.start,),
            on_stop=(
                webhooks.stop,
                service.drain,
                provider.close,
                close_task_channel,
                *((close_credentials,) if close_credentials else ()),
                revocations.aclose,
                client.aclose,
            ),
        ),
    )
    return runner, webhooks


async def serve(environ: Mapping[str, str]) -> None:
    settings = NotifySettings.from_env(environ)
    configure_service_logging("notify_svc", settings.server)
    runner, _ = build_runner(settings)
    await runner.serve_until_signalled()


def main() -> None:
    run_main("notify_svc", serve, NotifySettings)
