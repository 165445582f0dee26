"""Per-RPC context shared by logs, metrics and handlers (asyncio-task local)."""

from __future__ import annotations

import re
from contextvars import ContextVar
from dataclasses import dataclass

from mesh.errors import Unauthenticated
from opsmesh.errors.v1 import errors_pb2

request_id_var: ContextVar[str | None] = ContextVar("opsmesh_request_id", default=None)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a user of an organization, or a service."""

    user_id: str
    org_id: str
    roles: frozenset[str] = frozenset()

    def has_role(self, role: str) -> bool:
        return role in self.roles


principal_var: ContextVar[Principal | None] = ContextVar("opsmesh_principal", default=None)
# The caller's own credential, forwarded when this service calls another on its behalf.
authorization_var: ContextVar[str | None] = ContextVar("opsmesh_authorization", default=None)


def current_principal() -> Principal:
    """The authenticated caller of the RPC being handled.

    The RPC interceptor sets it before any handler of a protected method runs,
    so a handler that finds none has a wiring bug, not a client mistake.
    """
    principal = principal_var.get()
    if principal is None:
        raise RuntimeError("no authenticated principal in this context")
    return principal


_IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}")
_ROLE = re.compile(r"[a-z][a-z0-9_:.-]{0,63}")
PLATFORM_ROLES = frozenset({"platform:admin", "platform:operator"})
"""Roles over the whole platform (every organization's data in the agents' tools). Only the
operator grants them (the accounts command); an organization's own roles (admin, operator,
member), which its admins hand out, never reach beyond that organization."""


def parse_identifier(value: str | None, what: str) -> str:
    if not value:
        raise Unauthenticated(f"missing {what}", reason=errors_pb2.ERROR_REASON_MISSING_CREDENTIALS)
    if _IDENTIFIER.fullmatch(value) is None:
        raise Unauthenticated(
            f"malformed {what}: expected 1-128 characters of letters, digits and ._@+-",
            reason=errors_pb2.ERROR_REASON_MALFORMED_CREDENTIALS,
        )
    return value


def parse_roles(value: str | None) -> frozenset[str]:
    if not value:
        return frozenset()
    roles = frozenset(role.strip() for role in value.split(",") if role.strip())
    for role in roles:
        if _ROLE.fullmatch(role) is None:
            raise Unauthenticated(
                f"malformed role {role!r}", reason=errors_pb2.ERROR_REASON_MALFORMED_CREDENTIALS
            )
    return roles
