"""Who is calling: the authenticator interface and its implementations.

The RPC interceptor asks an :class:`Authenticator` for the principal of every
call to a protected method. Until the identity service issues JWTs, the only
implementation trusts identity headers set by a trusted caller (a developer's
grpcurl, the tests); the JWT verifier will implement the same interface.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Protocol

from mesh.context import Principal
from mesh.errors import Unauthenticated

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

_IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}")
_ROLE = re.compile(r"[a-z][a-z0-9_:.-]{0,63}")


class Authenticator(Protocol):
    """Turns a call's metadata into the caller's principal, or raises Unauthenticated."""

    async def authenticate(self, metadata: Mapping[str, str], method: str) -> Principal: ...


def is_public_method(method: str) -> bool:
    return method.startswith(PUBLIC_METHOD_PREFIXES)


def parse_identifier(value: str | None, what: str) -> str:
    if not value:
        raise Unauthenticated(f"missing {what}", reason="MISSING_CREDENTIALS")
    if _IDENTIFIER.fullmatch(value) is None:
        raise Unauthenticated(
            f"malformed {what}: expected 1-128 characters of letters, digits and ._@+-",
            reason="MALFORMED_CREDENTIALS",
        )
    return value


def parse_roles(value: str | None) -> frozenset[str]:
    if not value:
        return frozenset()
    roles = frozenset(role.strip() for role in value.split(",") if role.strip())
    for role in roles:
        if _ROLE.fullmatch(role) is None:
            raise Unauthenticated(f"malformed role {role!r}", reason="MALFORMED_CREDENTIALS")
    return roles


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


def authenticator_from_mode(mode: str) -> Authenticator:
    """The authenticator a service's ``OPSMESH_AUTH_MODE`` selects."""
    if mode == "trusted-headers":
        log.warning(
            "auth mode trusted-headers: callers' identity headers are believed as sent; "
            "never expose this service beyond a trusted network"
        )
        return TrustedHeaderAuthenticator()
    raise ValueError(f"unknown auth mode {mode!r}")
