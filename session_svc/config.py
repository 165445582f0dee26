"""Session service settings, read from OPSMESH_* environment variables."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from mesh.auth import AuthSettings
from mesh.redisconn import RedisSettings
from mesh.settings import ServerSettings, fixed, integer, load, nested, seconds, string

DEFAULT_GRPC_PORT = 50051
DEFAULT_METRICS_PORT = 9151


_DAY = 86400.0


@dataclass(frozen=True, kw_only=True)
class SessionLimits:
    default_ttl: float = seconds("OPSMESH_SESSION_TTL", 3600.0, minimum=1, maximum=365 * _DAY)
    """Inactivity TTL of a session created without one, in seconds."""
    min_ttl: float = seconds("OPSMESH_SESSION_MIN_TTL", 60.0, minimum=1, maximum=365 * _DAY)
    max_ttl: float = seconds("OPSMESH_SESSION_MAX_TTL", 30 * _DAY, minimum=1, maximum=365 * _DAY)
    max_context_bytes: int = integer(
        "OPSMESH_SESSION_MAX_CONTEXT_BYTES", 64 * 1024, minimum=256, maximum=16 * 1024**2
    )
    """Largest context a session may hold (protobuf encoding)."""
    max_title_chars: int = fixed(200, why="the contract's limit, not a deployment's")
    max_sessions_per_user: int = integer(
        "OPSMESH_SESSION_MAX_PER_USER", 1000, minimum=1, maximum=1_000_000
    )

    def check(self, problems: list[str]) -> None:
        if not self.min_ttl <= self.default_ttl <= self.max_ttl:
            problems.append(
                f"OPSMESH_SESSION_TTL={self.default_ttl:g}s must lie within "
                f"OPSMESH_SESSION_MIN_TTL={self.min_ttl:g}s and "
                f"OPSMESH_SESSION_MAX_TTL={self.max_ttl:g}s"
            )


@dataclass(frozen=True, kw_only=True)
class SessionSettings:
    server: ServerSettings = nested(
        ServerSettings, port=DEFAULT_GRPC_PORT, metrics_port=DEFAULT_METRICS_PORT
    )
    redis: RedisSettings = nested(RedisSettings)
    limits: SessionLimits = nested(SessionLimits)
    key_prefix: str = string("OPSMESH_SESSION_KEY_PREFIX", "opsmesh:session:")
    auth: AuthSettings = nested(AuthSettings)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> SessionSettings:
        return load(cls, environ)
