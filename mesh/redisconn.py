"""Redis connections for services: a plain URL or Redis Sentinel, same code.

Failures of Redis become :class:`~mesh.errors.DependencyUnavailable` through
:func:`redis_errors`, so every service maps them identically (UNAVAILABLE).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from mesh.errors import DependencyUnavailable
from mesh.settings import EnvReader

# Errors that mean "Redis cannot serve this now" (down, failing over, loading, timing out).
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.TryAgainError,
    redis.exceptions.MasterDownError,
    OSError,
)


@dataclass(frozen=True, kw_only=True)
class RedisSettings:
    url: str = "redis://127.0.0.1:6379/0"
    sentinels: tuple[tuple[str, int], ...] = ()
    """Sentinel addresses; when set, the master of ``sentinel_master`` is used instead of url."""
    sentinel_master: str = "mymaster"
    password: str | None = None
    db: int = 0
    socket_timeout: float = 1.0
    connect_timeout: float = 1.0
    max_connections: int = 64

    @classmethod
    def from_env(cls, env: EnvReader, *, default_url: str) -> RedisSettings:
        sentinels_raw = env.string("OPSMESH_REDIS_SENTINELS", "")
        sentinels: list[tuple[str, int]] = []
        for item in filter(None, (part.strip() for part in sentinels_raw.split(","))):
            host, sep, port = item.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                env.problem(
                    f"OPSMESH_REDIS_SENTINELS={sentinels_raw!r}: expected host:port[,host:port]"
                )
                break
            sentinels.append((host.strip("[]"), int(port)))
        url = env.string("OPSMESH_REDIS_URL", default_url)
        if not url.startswith(("redis://", "rediss://", "unix://")):
            env.problem(f"OPSMESH_REDIS_URL={url!r}: expected a redis://, rediss:// or unix:// URL")
        return cls(
            url=url,
            sentinels=tuple(sentinels),
            sentinel_master=env.string("OPSMESH_REDIS_SENTINEL_MASTER", "mymaster"),
            password=env.string("OPSMESH_REDIS_PASSWORD", "") or None,
            db=env.integer("OPSMESH_REDIS_DB", 0, minimum=0, maximum=15),
            socket_timeout=env.seconds("OPSMESH_REDIS_TIMEOUT", 1.0, minimum=0.01, maximum=60),
            connect_timeout=env.seconds(
                "OPSMESH_REDIS_CONNECT_TIMEOUT", 1.0, minimum=0.01, maximum=60
            ),
            max_connections=env.integer(
                "OPSMESH_REDIS_MAX_CONNECTIONS", 64, minimum=1, maximum=10_000
            ),
        )


def _no_retries() -> Retry:
    # A write whose reply was lost cannot be told from one never done, so nothing is retried
    # here: the RPC answers UNAVAILABLE and the caller decides (reads are safe to repeat).
    return Retry(NoBackoff(), 0)


def connect_redis(settings: RedisSettings) -> aioredis.Redis:
    """A client for the configured Redis; connections open lazily, on first use."""
    if settings.sentinels:
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(settings.sentinels),
            socket_timeout=settings.socket_timeout,
            socket_connect_timeout=settings.connect_timeout,
        )
        master: aioredis.Redis = sentinel.master_for(
            settings.sentinel_master,
            password=settings.password,
            db=settings.db,
            socket_timeout=settings.socket_timeout,
            socket_connect_timeout=settings.connect_timeout,
            max_connections=settings.max_connections,
            retry=_no_retries(),
        )
        return master
    client: aioredis.Redis = aioredis.Redis.from_url(
        settings.url,
        password=settings.password,
        socket_timeout=settings.socket_timeout,
        socket_connect_timeout=settings.connect_timeout,
        max_connections=settings.max_connections,
        retry=_no_retries(),
    )
    return client


@contextmanager
def redis_errors() -> Iterator[None]:
    """Turns Redis outages inside the block into DependencyUnavailable."""
    try:
        yield
    except UNAVAILABLE_ERRORS as error:
        raise DependencyUnavailable("redis", error) from error
