"""Calls from one service to another, on behalf of the caller or of a task's owner."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

from mesh.auth import ORG_HEADER, ROLES_HEADER, USER_HEADER
from mesh.context import Principal, authorization_var
from mesh.errors import DependencyUnavailable
from mesh.settings import string
from mesh.tokens import ACT_AS_ORG_HEADER, ACT_AS_USER_HEADER

Metadata = tuple[tuple[str, str], ...]
Credentials = Callable[[Principal], Awaitable[Metadata]]


def identity_metadata(principal: Principal) -> Metadata:
    """Metadata that carries ``principal`` to another service for the RPC being handled.

    The caller's own bearer token is forwarded when it brought one (services in jwt mode
    verify it); the identity headers serve services in trusted-headers mode.
    """
    metadata = [(USER_HEADER, principal.user_id), (ORG_HEADER, principal.org_id)]
    if principal.roles:
        metadata.append((ROLES_HEADER, ",".join(sorted(principal.roles))))
    authorization = authorization_var.get()
    if authorization:
        metadata.append(("authorization", authorization))
    return tuple(metadata)


async def trusted_headers(principal: Principal) -> Metadata:
    return identity_metadata(principal)


class ServiceCredentials:
    """A service's own access token (OAuth client credentials), acting for one org per call.

    The token is fetched from the issuer's token endpoint and reused until shortly before it
    expires; concurrent callers share one fetch.
    """

    def __init__(self, *, token_url: str, client_id: str, secret: str) -> None:
        self._token_url = token_url
        self._auth = (client_id, secret)
        self._token = ""
        self._renew_at = 0.0
        self._lock = asyncio.Lock()
        self._http = httpx.AsyncClient(timeout=5.0)

    async def token(self) -> str:
        async with self._lock:
            if time.monotonic() >= self._renew_at:
                try:
                    reply = await self._http.post(
                        self._token_url, data={"grant_type": "client_credentials"}, auth=self._auth
                    )
                    reply.raise_for_status()
                except httpx.HTTPError as error:
                    raise DependencyUnavailable("token endpoint", error) from error
                body = reply.json()
                self._token = body["access_token"]
                self._renew_at = time.monotonic() + 0.8 * float(body["expires_in"])
            return self._token

    async def __call__(self, principal: Principal) -> Metadata:
        return (
            ("authorization", f"Bearer {await self.token()}"),
            (ACT_AS_USER_HEADER, principal.user_id),
            (ACT_AS_ORG_HEADER, principal.org_id),
        )

    async def close(self) -> None:
        await self._http.aclose()


@dataclass(frozen=True, kw_only=True)
class ServiceClientSettings:
    """A service's own OAuth client, for calls it makes on its own behalf (queueing work,
    delivering email); without one it forwards the caller's credentials."""

    token_url: str = string("OPSMESH_SERVICE_TOKEN_URL", doc="the issuer's token endpoint")
    client_id: str = string("OPSMESH_SERVICE_CLIENT_ID")
    secret: str = string("OPSMESH_SERVICE_CLIENT_SECRET")

    def check(self, problems: list[str]) -> None:
        given = [bool(self.token_url), bool(self.client_id), bool(self.secret)]
        if any(given) and not all(given):
            problems.append(
                "OPSMESH_SERVICE_TOKEN_URL, OPSMESH_SERVICE_CLIENT_ID and "
                "OPSMESH_SERVICE_CLIENT_SECRET go together: set all three or none"
            )


def service_credentials(
    settings: ServiceClientSettings,
) -> tuple[Credentials, Callable[[], Awaitable[None]] | None]:
    """The credentials the settings select and what closes them (None: nothing to close)."""
    if not settings.token_url:
        return trusted_headers, None
    credentials = ServiceCredentials(
        token_url=settings.token_url, client_id=settings.client_id, secret=settings.secret
    )
    return credentials, credentials.close
