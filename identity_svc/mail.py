"""Identity's emails (password reset, password changed, invitations) go through notify_svc's
SendEmail, as the identity *service*: notify lets only services send these templates.

Identity holds the signing keys, so it mints its own service token (``service:identity``,
role ``service``, acting for the account's organization per call, like any service client)
instead of asking its own token endpoint for one. With ``OPSMESH_AUTH_MODE`` other than
``jwt`` the identity travels in the trusted headers, like the task worker's.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from grpc import aio

from identity_svc.keys import KeyRing, issue_access_token
from mesh.auth import AuthSettings
from mesh.clients import Metadata, identity_metadata
from mesh.context import Principal
from mesh.errors import DependencyUnavailable
from mesh.settings import fixed, string
from mesh.tokens import ACT_AS_ORG_HEADER, ACT_AS_USER_HEADER
from opsmesh.notify.v1 import notify_pb2, notify_pb2_grpc

SERVICE_USER = "service:identity"
_TOKEN_TTL = 300.0
"""The service token's lifetime; it is renewed a minute before it ends."""


class Mailer(Protocol):
    """Sends a notify_svc template to one address, for the account's organization."""

    async def send_email(
        self, *, template: str, to: str, org_id: str, data: Mapping[str, Any]
    ) -> None: ...


@dataclass(frozen=True, kw_only=True)
class MailSettings:
    notify_address: str = string("OPSMESH_NOTIFY_ADDR", doc="empty: identity sends no email")
    """notify_svc's gRPC address (OPSMESH_NOTIFY_ADDR); empty: identity sends no email."""
    timeout: float = fixed(10.0, why="a downstream deadline, not a deployment's choice")


class NotifyMailer:
    """Sends notify_svc templates to one address as the identity service."""

    def __init__(self, settings: MailSettings, *, ring: KeyRing, auth: AuthSettings) -> None:
        self._settings = settings
        self._ring = ring
        self._auth = auth
        self._channel = aio.insecure_channel(settings.notify_address or "127.0.0.1:1")
        self._notifications = notify_pb2_grpc.NotificationServiceStub(self._channel)
        self._token = ""
        self._renew_at = 0.0

    def _metadata(self, org_id: str) -> Metadata:
        if self._auth.mode != "jwt":
            return identity_metadata(Principal("identity", org_id, frozenset({"service"})))
        if time.monotonic() >= self._renew_at:
            self._token = issue_access_token(
                self._ring,
                Principal(SERVICE_USER, "*", frozenset({"service"})),
                issuer=self._auth.issuer,
                audience=self._auth.audience,
                ttl=_TOKEN_TTL,
            )
            self._renew_at = time.monotonic() + _TOKEN_TTL - 60
        return (
            ("authorization", f"Bearer {self._token}"),
            (ACT_AS_ORG_HEADER, org_id),
            (ACT_AS_USER_HEADER, "identity"),
        )

    async def send_email(
        self, *, template: str, to: str, org_id: str, data: Mapping[str, Any]
    ) -> None:
        if not self._settings.notify_address:
            raise DependencyUnavailable("notify", "OPSMESH_NOTIFY_ADDR is not set")
        request = notify_pb2.SendEmailRequest(
            template=template, to=[notify_pb2.Recipient(address=to)]
        )
        request.data.update(dict(data))
        await self._notifications.SendEmail(
            request, metadata=self._metadata(org_id), timeout=self._settings.timeout
        )

    async def close(self) -> None:
        await self._channel.close(None)
