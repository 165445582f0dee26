"""Redis connections for services: a plain URL or Redis Sentinel, same code.

Failures of Redis become :class:`~mesh.errors.DependencyUnavailable` through
:func:`redis_errors`, so every service maps them identically (UNAVAILABLE).

The connection pool queues: under a burst bigger than ``max_connections`` a command waits for
a free connection (at most ``pool_timeout``) instead of failing with "Too many connections";
a wait that times out is :class:`PoolExhausted`, UNAVAILABLE with metadata
``cause=pool_exhausted``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff

from mesh.errors import DependencyUnavailable
from mesh.settings import integer, seconds, setting, string, url

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
"""Redis' own default address: the dev stack (``make up``) sets its own explicitly."""

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


def _sentinel_addresses(raw: str) -> tuple[tuple[str, int], ...]:
    addresses: list[tuple[str, int]] = []
    for item in filter(None, (part.strip() for part in raw.split(","))):
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("expected host:port[,host:port]")
        addresses.append((host.strip("[]"), int(port)))
    return tuple(addresses)


def _password(raw: str) -> str | None:
    return raw


@dataclass(frozen=True, kw_only=True)
class RedisSettings:
    url: str = url(
        "OPSMESH_REDIS_URL",
        DEFAULT_REDIS_URL,
        schemes=("redis://", "rediss://", "unix://"),
        expected="a redis://, rediss:// or unix:// URL",
    )
    sentinels: tuple[tuple[str, int], ...] = setting(
        "OPSMESH_REDIS_SENTINELS", (), _sentinel_addresses, doc="host:port[,host:port]"
    )
    """Sentinel addresses; when set, the master of ``sentinel_master`` is used instead of url."""
    sentinel_master: str = string("OPSMESH_REDIS_SENTINEL_MASTER", "mymaster")
    password: str | None = setting("OPSMESH_REDIS_PASSWORD", None, _password)
    db: int = integer("OPSMESH_REDIS_DB", 0, minimum=0, maximum=15)
    socket_timeout: float = seconds("OPSMESH_REDIS_TIMEOUT", 1.0, minimum=0.01, maximum=60)
    connect_timeout: float = seconds("OPSMESH_REDIS_CONNECT_TIMEOUT", 1.0, minimum=0.01, maximum=60)
    max_connections: int = integer("OPSMESH_REDIS_MAX_CONNECTIONS", 64, minimum=1, maximum=10_000)
    pool_timeout: float = seconds("OPSMESH_REDIS_POOL_TIMEOUT", 1.0, minimum=0.001, maximum=60)
    """Seconds a command waits for a free connection when all ``max_connections`` are busy."""


def _no_retries() -> Retry:
    # A write whose reply was lost cannot be told from one never done, so nothing is retried
    # here: the RPC answers UNAVAILABLE and the caller decides (reads are safe to repeat).
    return Retry(NoBackoff(), 0)


class PoolExhausted(redis.exceptions.ConnectionError):
    """Every pooled connection stayed busy for the whole ``pool_timeout``."""


class QueueingPool(aioredis.BlockingConnectionPool):
    """A pool whose commands wait their turn for a connection, for a bounded time."""

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        except redis.exceptions.ConnectionError as error:
            if not isinstance(error.__cause__, asyncio.TimeoutError):
                raise
            raise PoolExhausted(
                f"no Redis connection free within {self.timeout:g}s "
                f"(all {self.max_connections} in use)"
            ) from error


class QueueingSentinelPool(SentinelConnectionPool, QueueingPool):
    """:class:`QueueingPool` for the master Sentinel names."""


def connect_redis(settings: RedisSettings) -> aioredis.Redis:
    """A client for the configured Redis; connections open lazily, on first use."""
    pooling: dict[str, Any] = {
        "password": settings.password,
        "socket_timeout": settings.socket_timeout,
        "socket_connect_timeout": settings.connect_timeout,
        "max_connections": settings.max_connections,
        "timeout": settings.pool_timeout,
        "retry": _no_retries(),
    }
    if settings.sentinels:
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(settings.sentinels),
            socket_timeout=settings.socket_timeout,
            socket_connect_timeout=settings.connect_timeout,
        )
        master: aioredis.Redis = sentinel.master_for(
            settings.sentinel_master,
            connection_pool_class=QueueingSentinelPool,
            db=settings.db,
            **pooling,
        )
        return master
    pool = QueueingPool.from_url(settings.url, **pooling)
    return aioredis.Redis.from_pool(pool)


@contextmanager
def redis_errors() -> Iterator[None]:
    """Turns Redis outages inside the block into DependencyUnavailable."""
    try:
        yield
    except PoolExhausted as error:
        unavailable = DependencyUnavailable("redis", str(error))
        unavailable.metadata["cause"] = "pool_exhausted"
        raise unavailable from error
    except UNAVAILABLE_ERRORS as error:
        raise DependencyUnavailable("redis", error) from error
