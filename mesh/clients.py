"""Calls from one service to another, on behalf of the caller or of a task's owner."""

from __future__ import annotations

from mesh.auth import ORG_HEADER, ROLES_HEADER, USER_HEADER
from mesh.context import Principal


def identity_metadata(principal: Principal) -> tuple[tuple[str, str], ...]:
    """Metadata that carries ``principal`` to another service.

    In trusted-headers mode this is the identity itself; the identity service's
    service credentials replace it behind this function.
    """
    metadata = [(USER_HEADER, principal.user_id), (ORG_HEADER, principal.org_id)]
    if principal.roles:
        metadata.append((ROLES_HEADER, ",".join(sorted(principal.roles))))
    return tuple(metadata)
