"""Notification service settings, read from OPSMESH_* environment variables."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from mesh.auth import AuthSettings
from mesh.clients import ServiceClientSettings
from mesh.redisconn import RedisSettings
from mesh.settings import ServerSettings, choice, load, nested, seconds, string
from notify_svc.smtp import SmtpSettings
from notify_svc.webhooks import WebhookSettings

DEFAULT_GRPC_PORT = 50053
DEFAULT_METRICS_PORT = 9153


@dataclass(frozen=True, kw_only=True)
class NotifySettings:
    server: ServerSettings = nested(
        ServerSettings, port=DEFAULT_GRPC_PORT, metrics_port=DEFAULT_METRICS_PORT
    )
    redis: RedisSettings = nested(RedisSettings)
    smtp: SmtpSettings = nested(SmtpSettings)
    provider: str = choice("OPSMESH_MAIL_PROVIDER", "smtp", ("smtp", "sendgrid"))
    """The primary provider: smtp or sendgrid."""
    fallback: str = choice("OPSMESH_MAIL_FALLBACK", "", ("", "smtp", "sendgrid"))
    """A provider to use when the primary fails transiently; empty: none."""
    sendgrid_api_key: str = string("OPSMESH_SENDGRID_API_KEY")
    sendgrid_url: str = string("OPSMESH_SENDGRID_URL", "https://api.sendgrid.com")
    task_address: str = string("OPSMESH_TASK_ADDR", "127.0.0.1:50054")
    """The task service, which queues email deliveries."""
    webhooks: WebhookSettings = nested(WebhookSettings)
    key_prefix: str = string("OPSMESH_NOTIFY_KEY_PREFIX", "opsmesh:notify:")
    retention: float = seconds(
        "OPSMESH_NOTIFY_RETENTION", 30 * 86400.0, minimum=3600, maximum=3650 * 86400
    )
    claim_lease: float = seconds("OPSMESH_NOTIFY_CLAIM_LEASE", 30.0, minimum=1, maximum=600)
    """How long a delivery's claim lasts unless renewed: a crashed replica's claim lapses after
    it, and shutdown waits this long for deliveries whose callers left."""
    auth: AuthSettings = nested(AuthSettings)
    service_client: ServiceClientSettings = nested(ServiceClientSettings)
    """notify_svc's own client: it queues deliveries with it (webhooks bring no token)."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> NotifySettings:
        return load(cls, environ)

    def check(self, problems: list[str]) -> None:
        if "sendgrid" in (self.provider, self.fallback) and not self.sendgrid_api_key:
            problems.append("OPSMESH_SENDGRID_API_KEY is required when SendGrid is a mail provider")
        if self.fallback and self.fallback == self.provider:
            problems.append("OPSMESH_MAIL_FALLBACK must differ from OPSMESH_MAIL_PROVIDER")
