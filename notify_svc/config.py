"""Notification service settings, read from OPSMESH_* environment variables."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from mesh.auth import AuthSettings
from mesh.clients import ServiceClientSettings
from mesh.redisconn import DEFAULT_REDIS_URL, RedisSettings
from mesh.settings import EnvReader, ServerSettings
from notify_svc.smtp import SmtpSettings
from notify_svc.webhooks import WebhookSettings

DEFAULT_GRPC_PORT = 50053
DEFAULT_METRICS_PORT = 9153


@dataclass(frozen=True, kw_only=True)
class NotifySettings:
    server: ServerSettings
    redis: RedisSettings
    smtp: SmtpSettings
    provider: str = "smtp"
    """The primary provider: smtp or sendgrid."""
    fallback: str = ""
    """A provider to use when the primary fails transiently; empty: none."""
    sendgrid_api_key: str = ""
    sendgrid_url: str = "https://api.sendgrid.com"
    task_address: str = "127.0.0.1:50054"
    """The task service, which queues email deliveries."""
    webhooks: WebhookSettings = field(default_factory=lambda: WebhookSettings(port=0))
    key_prefix: str = "opsmesh:notify:"
    retention: float = 30 * 86400.0
    claim_lease: float = 30.0
    """How long a delivery's claim lasts unless renewed: a crashed replica's claim lapses after
    it, and shutdown waits this long for deliveries whose callers left."""
    auth: AuthSettings = field(default_factory=AuthSettings)
    service_client: ServiceClientSettings = field(default_factory=ServiceClientSettings)
    """notify_svc's own client: it queues deliveries with it (webhooks bring no token)."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> NotifySettings:
        env = EnvReader(environ)
        settings = cls(
            server=ServerSettings.from_env(
                env, default_port=DEFAULT_GRPC_PORT, default_metrics_port=DEFAULT_METRICS_PORT
            ),
            redis=RedisSettings.from_env(env, default_url=DEFAULT_REDIS_URL),
            smtp=SmtpSettings.from_env(env),
            provider=env.string("OPSMESH_MAIL_PROVIDER", "smtp", choices=("smtp", "sendgrid")),
            fallback=env.string("OPSMESH_MAIL_FALLBACK", "", choices=("", "smtp", "sendgrid")),
            sendgrid_api_key=env.string("OPSMESH_SENDGRID_API_KEY", ""),
            sendgrid_url=env.string("OPSMESH_SENDGRID_URL", "https://api.sendgrid.com"),
            task_address=env.string("OPSMESH_TASK_ADDR", "127.0.0.1:50054"),
            webhooks=WebhookSettings.from_env(env),
            key_prefix=env.string("OPSMESH_NOTIFY_KEY_PREFIX", "opsmesh:notify:"),
            retention=env.seconds(
                "OPSMESH_NOTIFY_RETENTION", 30 * 86400.0, minimum=3600, maximum=3650 * 86400
            ),
            claim_lease=env.seconds("OPSMESH_NOTIFY_CLAIM_LEASE", 30.0, minimum=1, maximum=600),
            auth=AuthSettings.from_env(env),
            service_client=ServiceClientSettings.from_env(env),
        )
        if "sendgrid" in (settings.provider, settings.fallback) and not settings.sendgrid_api_key:
            env.problem("OPSMESH_SENDGRID_API_KEY is required when SendGrid is a mail provider")
        if settings.fallback and settings.fallback == settings.provider:
            env.problem("OPSMESH_MAIL_FALLBACK must differ from OPSMESH_MAIL_PROVIDER")
        env.check()
        return settings
