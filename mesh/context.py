"""Per-RPC context shared by logs, metrics and handlers (asyncio-task local)."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

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


def current_principal() -> Principal:
    """The authenticated caller of the RPC being handled.

    The RPC interceptor sets it before any handler of a protected method runs,
    so a handler that finds none has a wiring bug, not a client mistake.
    """
    principal = principal_var.get()
    if principal is None:
        raise RuntimeError("no authenticated principal in this context")
    return principal
