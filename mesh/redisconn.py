"""Redis connections for services: a plain URL or Redis Sentinel, same code.

Failures of Redis become :class:`~mesh.errors.DependencyUnavailable` through
:func:`redis_errors`, so every service maps them identically (UNAVAILABLE).

The connection pool queues: under a burst bigger than ``max_connections`` a command waits for
a free connection (at most ``pool_timeout``) instead of failing with "Too many connections";
a wait that times out is :class:`PoolExhausted`, UNAVAILABLE with metadata
``cause=pool_exhausted``. A command that finds a free connection and nobody queued before it
takes it straight away, without the queue's lock and timer.

:class:`LuaScript` runs a Lua script in one ``EVALSHA`` on a pooled connection, for hot paths
where redis-py's generic command path costs more CPU than the round trip itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.connection import AbstractConnection
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
    redis.exceptions.OutOfMemoryError,  # at maxmemory: writes refused until memory is freed
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
    """A pool whose commands wait their turn for a connection, for a bounded time.

    The queue (redis-py's condition, lock and timeout) is only entered when it is needed: a
    free connection with nobody queued is handed out directly, and given back directly while
    nobody waits for it. In the session bench that was 12% of a GetSession's CPU per call.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._queued = 0
        """Callers inside the queued path: while any wait, newcomers queue behind them."""
        # A streaming credential provider re-authenticates connections as they come back;
        # only the queued release runs that hook.
        self._direct_release = kwargs.get("credential_provider") is None

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        if self._available_connections and not (self._queued or self._in_maintenance):
            return await self._take_free_connection()
        self._queued += 1
        try:
            return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        except redis.exceptions.ConnectionError as error:
            if not isinstance(error.__cause__, asyncio.TimeoutError):
                raise
            raise PoolExhausted(
                f"no Redis connection free within {self.timeout:g}s "
                f"(all {self.max_connections} in use)"
            ) from error
        finally:
            self._queued -= 1

    async def _take_free_connection(self) -> AbstractConnection:
        connection = self._available_connections.pop()
        self._in_use_connections.add(connection)
        try:
            # What ensure_connection checks, skipped while the connection is open and idle:
            # unread bytes or a closed socket make ensure_connection reconnect it.
            if not connection.is_connected or await connection.can_read():
                await self.ensure_connection(connection)
        except BaseException:
            await super().release(connection)
            raise
        return connection

    async def release(self, connection: AbstractConnection) -> None:
        if (
            self._queued
            or self._in_maintenance
            or not self._direct_release
            or connection.should_reconnect()  # type: ignore[no-untyped-call]
        ):
            # Someone may wait for this connection (the queue notifies them), or it needs work.
            await super().release(connection)
            return
        self._in_use_connections.remove(connection)
        self._available_connections.append(connection)


class QueueingSentinelPool(SentinelConnectionPool, QueueingPool):
    """:class:`QueueingPool` for the master Sentinel names."""


class LuaScript:
    """A Lua script run with one ``EVALSHA`` on a connection of ``client``'s pool.

    Same wire exchange as redis-py's registered scripts, without its generic command path
    (retry wrapper, observability hooks, per-call imports): about 40% of the CPU of a
    GetSession's Redis call. Errors behave as there: a connection that fails or is cancelled
    mid-exchange is disconnected before it goes back to the pool (never reused with a reply
    pending), and a Redis that lost its scripts (restart, ``SCRIPT FLUSH``) gets this one loaded
    again, then run (``NOSCRIPT`` means nothing ran).
    """

    def __init__(self, client: aioredis.Redis, source: str) -> None:
        self._pool = client.connection_pool
        self._source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()

    @property
    def source(self) -> str:
        return self._source

    def command(
        self, keys: Sequence[str], args: Sequence[str | bytes | int | float]
    ) -> tuple[Any, ...]:
        """The ``EVALSHA`` command that runs this script."""
        return ("EVALSHA", self.sha, len(keys), *keys, *args)

    async def __call__(self, keys: Sequence[str], args: Sequence[str | bytes | int]) -> Any:
        connection: AbstractConnection = await self._pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            (reply,) = await exchange(connection, [self.command(keys, args)])
            if isinstance(reply, redis.exceptions.NoScriptError):
                await exchange(connection, [("SCRIPT", "LOAD", self._source)])
                (reply,) = await exchange(connection, [self.command(keys, args)])
        finally:
            await self._pool.release(connection)
        if isinstance(reply, redis.exceptions.ResponseError):
            raise reply
        return reply


async def exchange(connection: AbstractConnection, commands: Sequence[Sequence[Any]]) -> list[Any]:
    """Sends ``commands`` in one write and reads their replies, in order; an error reply is
    returned in its place (a ``ResponseError``), the exchange being complete all the same.

    One timer (the connection's socket timeout) for the whole exchange: redis-py's
    ``send_command`` times the write with ``asyncio.wait_for`` (a Task per call) and each read
    with another timer. A connection that fails, times out or is cancelled mid-exchange is
    disconnected before anyone can reuse it with a reply still pending.
    """
    packed = connection.pack_commands(commands)
    timeout = connection.socket_timeout
    replies: list[Any] = []
    try:
        async with asyncio.timeout(timeout):
            await connection._send_packed_command(packed)
            for _ in commands:
                try:
                    replies.append(await connection.read_response(timeout=math.inf))
                except redis.exceptions.ResponseError as error:
                    replies.append(error)
    except TimeoutError:
        await connection.disconnect(nowait=True)
        raise redis.exceptions.TimeoutError(f"no reply from Redis within {timeout:g}s") from None
    except OSError as error:
        await connection.disconnect(nowait=True)
        raise redis.exceptions.ConnectionError(f"writing to Redis failed: {error}") from error
    except BaseException:
        # Cancelled or failed mid-exchange: a reply may still come, so never reuse it.
        await connection.disconnect(nowait=True)
        raise
    return replies


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


class _RedisErrors:
    """The context manager of :func:`redis_errors`: stateless, so one instance serves every
    block (a ``@contextmanager`` generator cost ~2 us per Redis call)."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: object
    ) -> None:
        if isinstance(error, PoolExhausted):
            unavailable = DependencyUnavailable("redis", str(error))
            unavailable.metadata["cause"] = "pool_exhausted"
            raise unavailable from error
        if isinstance(error, UNAVAILABLE_ERRORS):
            raise DependencyUnavailable("redis", error) from error


_REDIS_ERRORS = _RedisErrors()


def redis_errors() -> _RedisErrors:
    """Turns Redis outages inside the block into DependencyUnavailable."""
    return _REDIS_ERRORS
