"""Who is calling: the authenticator interface and its implementations.

The RPC interceptor asks an :class:`Authenticator` for the principal of every
call to a protected method. Until the identity service issues JWTs, the only
implementation trusts identity headers set by a trusted caller (a developer's
grpcurl, the tests); the JWT verifier will implement the same interface.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from mesh.context import Principal, parse_identifier, parse_roles
from mesh.revocations import RevocationFeed
from mesh.settings import choice, setting, string, url
from mesh.tokens import JwtAuthenticator, RemoteJwks

log = logging.getLogger(__name__)

USER_HEADER = "x-opsmesh-user-id"
ORG_HEADER = "x-opsmesh-org-id"
ROLES_HEADER = "x-opsmesh-roles"

# Methods any caller may use: load balancers and grpcurl must reach them unauthenticated.
PUBLIC_METHOD_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


class Authenticator(Protocol):
    """Turns a call's metadata into the caller's principal, or raises Unauthenticated."""

    async def authenticate(self, metadata: Mapping[str, str], method: str) -> Principal: ...


def is_public_method(method: str) -> bool:
    return method.startswith(PUBLIC_METHOD_PREFIXES)


class TrustedHeaderAuthenticator:
    """Takes the caller's identity from ``x-opsmesh-user-id``/``-org-id``/``-roles``.

    Only safe where nothing untrusted can reach the service (a developer's
    laptop, tests): anyone who can connect can claim any identity. Services log
    a warning when they start with it.
    """

    async def authenticate(self, metadata: Mapping[str, str], method: str) -> Principal:
        return Principal(
            user_id=parse_identifier(metadata.get(USER_HEADER), f"{USER_HEADER} metadata"),
            org_id=parse_identifier(metadata.get(ORG_HEADER), f"{ORG_HEADER} metadata"),
            roles=parse_roles(metadata.get(ROLES_HEADER)),
        )


def _issuer(raw: str) -> str:
    return raw.rstrip("/")


@dataclass(frozen=True, kw_only=True)
class AuthSettings:
    """How a service learns who calls: ``jwt`` (verify access tokens) or ``trusted-headers``."""

    mode: str = choice("OPSMESH_AUTH_MODE", "trusted-headers", ("trusted-headers", "jwt"))
    issuer: str = setting("OPSMESH_JWT_ISSUER", "", _issuer, doc="required with jwt")
    audience: str = string("OPSMESH_JWT_AUDIENCE", "opsmesh")
    jwks_url: str = string("OPSMESH_JWKS_URL", "", doc="empty: <issuer>/.well-known/jwks.json")
    """Where the issuer publishes its keys; empty: ``<issuer>/.well-known/jwks.json``."""
    revocation_feed_url: str = url(
        "OPSMESH_REVOCATION_FEED_URL",
        "",
        schemes=("redis://", "rediss://", "unix://"),
        expected="a redis://, rediss:// or unix:// URL",
        doc="empty: OPSMESH_REDIS_URL",
    )
    """The Redis the issuer publishes revoked sessions to (mesh/revocations.py); empty: the
    service's own Redis (OPSMESH_REDIS_URL)."""

    def check(self, problems: list[str]) -> None:
        if self.mode == "jwt" and not self.issuer:
            problems.append(
                "OPSMESH_JWT_ISSUER is required with OPSMESH_AUTH_MODE=jwt: the issuer URL"
            )


def authenticator_for(
    settings: AuthSettings, *, revocations: RevocationFeed | None = None
) -> Authenticator:
    """The authenticator the settings select (JWT verification against the issuer's JWKS).

    With the ``revocations`` feed, tokens of revoked sessions are refused before they expire.
    """
    if settings.mode == "jwt":
        return JwtAuthenticator(
            keys=RemoteJwks(settings.jwks_url or f"{settings.issuer}/.well-known/jwks.json"),
            issuer=settings.issuer,
            audience=settings.audience,
            revoked=revocations,
        )
    return authenticator_from_mode(settings.mode)


def authenticator_from_mode(mode: str) -> Authenticator:
    """The trusted-headers authenticator (the only mode that needs no key material)."""
    if mode == "trusted-headers":
        log.warning(
            "auth mode trusted-headers: callers' identity headers are believed as sent; "
            "never expose this service beyond a trusted network"
        )
        return TrustedHeaderAuthenticator()
    raise ValueError(f"unknown auth mode {mode!r}")
