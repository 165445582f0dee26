"""Who may do what in the notification service (docs/notifications.md).

Sending is decided per template: the catalog names the kinds of sender each
template accepts, and a kind is a role the caller's principal carries. Services
with service credentials carry ``service``; org admins ``admin``; the webhooks
build their own principals with a webhook role, so a user can never send as one
through the API (the edge drops identity headers and user tokens carry no such role).
"""

from __future__ import annotations

from collections.abc import Collection

from mesh.context import Principal
from mesh.errors import PermissionDenied

SERVICE_ROLE = "service"
ADMIN_ROLE = "admin"
BILLING_WEBHOOK_ROLE = "webhook:billing"
ALERT_WEBHOOK_ROLE = "webhook:alertmanager"

# The sender kinds catalog.toml may name, and the role each one means.
SENDER_ROLES = {
    "service": SERVICE_ROLE,
    "admin": ADMIN_ROLE,
    "billing_webhook": BILLING_WEBHOOK_ROLE,
    "alert_webhook": ALERT_WEBHOOK_ROLE,
}

PREVIEW_ROLES = frozenset({ADMIN_ROLE, SERVICE_ROLE})
DELIVER_ROLES = frozenset({SERVICE_ROLE})


def require_role(principal: Principal, allowed: Collection[str], action: str) -> None:
    """PERMISSION_DENIED unless ``principal`` has one of the ``allowed`` roles."""
    if principal.roles.isdisjoint(allowed):
        raise PermissionDenied(
            f"{action} needs one of the roles {', '.join(sorted(allowed))}; "
            f"{principal.user_id} has {', '.join(sorted(principal.roles)) or 'none'}"
        )
