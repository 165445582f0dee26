"""Identity service settings, read from OPSMESH_* environment variables."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from identity_svc.accounts import SignInSettings
from identity_svc.http import IssuerSettings
from identity_svc.mail import MailSettings
from identity_svc.oauth import OAuthSettings
from identity_svc.reset import ResetSettings
from mesh.auth import AuthSettings
from mesh.redisconn import DEFAULT_REDIS_URL, RedisSettings
from mesh.settings import EnvReader, ServerSettings

DEFAULT_GRPC_PORT = 50058
DEFAULT_METRICS_PORT = 9158


@dataclass(frozen=True, kw_only=True)
class IdentitySettings:
    server: ServerSettings
    redis: RedisSettings
    """Accounts, authorization codes, refresh-token families, and the revocation feed the
    identity service publishes (mesh/revocations.py): the feed must live in this Redis, so
    that a revocation and its publication are one atomic step."""
    auth: AuthSettings = field(default_factory=AuthSettings)
    issuer: IssuerSettings
    oauth: OAuthSettings = field(default_factory=OAuthSettings)
    sign_in: SignInSettings = field(default_factory=SignInSettings)
    reset: ResetSettings = field(default_factory=ResetSettings)
    """Password reset links and their request limits."""
    mail: MailSettings = field(default_factory=MailSettings)
    """Where identity's emails go (notify_svc)."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> IdentitySettings:
        env = EnvReader(environ)
        settings = cls(
            server=ServerSettings.from_env(
                env, default_port=DEFAULT_GRPC_PORT, default_metrics_port=DEFAULT_METRICS_PORT
            ),
            redis=RedisSettings.from_env(env, default_url=DEFAULT_REDIS_URL),
            auth=AuthSettings.from_env(env),
            issuer=IssuerSettings.from_env(env),
            oauth=OAuthSettings.from_env(env),
            sign_in=SignInSettings.from_env(env),
            reset=ResetSettings.from_env(env),
            mail=MailSettings.from_env(env),
        )
        if settings.issuer.http_port and not settings.auth.issuer:
            env.problem(
                "OPSMESH_JWT_ISSUER is required: the issuer URL its tokens and discovery name "
                "(or OPSMESH_IDENTITY_HTTP_PORT=0 for no OAuth endpoints)"
            )
        env.check()
        return settings
