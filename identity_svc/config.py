"""Identity service settings, read from OPSMESH_* environment variables."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from identity_svc.accounts import SignInSettings
from identity_svc.http import IssuerSettings
from identity_svc.invitations import InvitationSettings
from identity_svc.mail import MailSettings
from identity_svc.oauth import OAuthSettings
from identity_svc.reset import ResetSettings
from mesh.auth import AuthSettings
from mesh.redisconn import RedisSettings
from mesh.settings import ServerSettings, load, nested

DEFAULT_GRPC_PORT = 50058
DEFAULT_METRICS_PORT = 9158


@dataclass(frozen=True, kw_only=True)
class IdentitySettings:
    server: ServerSettings = nested(
        ServerSettings, port=DEFAULT_GRPC_PORT, metrics_port=DEFAULT_METRICS_PORT
    )
    redis: RedisSettings = nested(RedisSettings)
    """Accounts, authorization codes, refresh-token families, and the revocation feed the
    identity service publishes (mesh/revocations.py): the feed must live in this Redis, so
    that a revocation and its publication are one atomic step."""
    auth: AuthSettings = nested(AuthSettings)
    issuer: IssuerSettings = nested(IssuerSettings)
    oauth: OAuthSettings = nested(OAuthSettings)
    sign_in: SignInSettings = nested(SignInSettings)
    reset: ResetSettings = nested(ResetSettings)
    """Password reset links and their request limits."""
    mail: MailSettings = nested(MailSettings)
    """Where identity's emails go (notify_svc)."""
    invitations: InvitationSettings = nested(InvitationSettings)
    """How long an invitation to an organization works."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> IdentitySettings:
        return load(cls, environ)

    def check(self, problems: list[str]) -> None:
        if self.issuer.http_port and not self.auth.issuer:
            problems.append(
                "OPSMESH_JWT_ISSUER is required: the issuer URL its tokens and discovery name "
                "(or OPSMESH_IDENTITY_HTTP_PORT=0 for no OAuth endpoints)"
            )
