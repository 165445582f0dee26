"""Session service settings, read from OPSMESH_* environment variables."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from mesh.auth import AuthSettings
from mesh.redisconn import DEFAULT_REDIS_URL, RedisSettings
from mesh.settings import EnvReader, ServerSettings

DEFAULT_GRPC_PORT = 50051
DEFAULT_METRICS_PORT = 9151


@dataclass(frozen=True, kw_only=True)
class SessionLimits:
    default_ttl: float = 3600.0
    """Inactivity TTL of a session created without one, in seconds."""
    min_ttl: float = 60.0
    max_ttl: float = 30 * 86400.0
    max_context_bytes: int = 64 * 1024
    """Largest context a session may hold (protobuf encoding)."""
    max_title_chars: int = 200
    max_sessions_per_user: int = 1000


@dataclass(frozen=True, kw_only=True)
class SessionSettings:
    server: ServerSettings
    redis: RedisSettings
    limits: SessionLimits
    key_prefix: str = "opsmesh:session:"
    auth: AuthSettings = field(default_factory=AuthSettings)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> SessionSettings:
        env = EnvReader(environ)
        server = ServerSettings.from_env(
            env, default_port=DEFAULT_GRPC_PORT, default_metrics_port=DEFAULT_METRICS_PORT
        )
        redis = RedisSettings.from_env(env, default_url=DEFAULT_REDIS_URL)
        day = 86400.0
        min_ttl = env.seconds("OPSMESH_SESSION_MIN_TTL", 60.0, minimum=1, maximum=365 * day)
        max_ttl = env.seconds("OPSMESH_SESSION_MAX_TTL", 30 * day, minimum=1, maximum=365 * day)
        default_ttl = env.seconds("OPSMESH_SESSION_TTL", 3600.0, minimum=1, maximum=365 * day)
        if not min_ttl <= default_ttl <= max_ttl:
            env.problem(
                f"OPSMESH_SESSION_TTL={default_ttl:g}s must lie within "
                f"OPSMESH_SESSION_MIN_TTL={min_ttl:g}s and OPSMESH_SESSION_MAX_TTL={max_ttl:g}s"
            )
        limits = SessionLimits(
            default_ttl=default_ttl,
            min_ttl=min_ttl,
            max_ttl=max_ttl,
            max_context_bytes=env.integer(
                "OPSMESH_SESSION_MAX_CONTEXT_BYTES", 64 * 1024, minimum=256, maximum=16 * 1024**2
            ),
            max_sessions_per_user=env.integer(
                "OPSMESH_SESSION_MAX_PER_USER", 1000, minimum=1, maximum=1_000_000
            ),
        )
        settings = cls(
            server=server,
            redis=redis,
            limits=limits,
            key_prefix=env.string("OPSMESH_SESSION_KEY_PREFIX", "opsmesh:session:"),
            auth=AuthSettings.from_env(env),
        )
        env.check()
        return settings
