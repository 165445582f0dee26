"""The Redis layer under the session store: the pool's direct hand-out and LuaScript.

Both take shortcuts past redis-py's generic paths for the GetSession hot path (issue #18), so
these check what the shortcuts must keep: a reply is only ever read by the call that asked for
it, waiters keep their turn, dead connections are replaced, lost scripts are loaded again.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
import redis.exceptions

from devtools.servers import RedisServer
from mesh.errors import DependencyUnavailable
from mesh.redisconn import LuaScript, QueueingPool, RedisSettings, connect_redis, redis_errors

ECHO = "redis.call('INCR', KEYS[1]) return ARGV[1]"


@pytest.fixture
async def single(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A client whose pool holds one connection: every call shares it."""
    client = connect_redis(RedisSettings(url=redis_server.url, max_connections=1))
    yield client
    await client.aclose()


@pytest.fixture
async def admin(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


def pool_of(client: aioredis.Redis) -> QueueingPool:
    pool = client.connection_pool
    assert isinstance(pool, QueueingPool)
    return pool


async def test_a_script_runs_and_is_loaded_again_after_redis_lost_it(
    single: aioredis.Redis, admin: aioredis.Redis
) -> None:
    echo = LuaScript(single, ECHO)
    assert await echo(["lua:count"], ["first"]) == b"first"
    await admin.script_flush()
    assert await echo(["lua:count"], ["second"]) == b"second"
    assert await admin.get("lua:count") == b"2", "NOSCRIPT ran nothing: each call ran once"


async def test_a_cancelled_call_never_leaves_its_reply_to_the_next_caller(
    single: aioredis.Redis, admin: aioredis.Redis
) -> None:
    echo = LuaScript(single, ECHO)
    await echo(["lua:count"], ["warm"])  # the one connection is open and idle
    await admin.execute_command("CLIENT", "PAUSE", "2000", "ALL")
    try:
        stalled = asyncio.create_task(echo(["lua:count"], ["for the cancelled call"]))
        await asyncio.sleep(0.1)  # sent, waiting for the reply Redis holds back
        stalled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stalled
    finally:
        await admin.execute_command("CLIENT", "UNPAUSE")
    assert await echo(["lua:count"], ["mine"]) == b"mine"
    assert await single.echo("plain") == b"plain"
    pool = pool_of(single)
    assert (len(pool._available_connections), len(pool._in_use_connections)) == (1, 0)


async def test_a_call_past_the_socket_timeout_fails_and_leaves_no_reply_behind(
    redis_server: RedisServer, admin: aioredis.Redis
) -> None:
    client = connect_redis(
        RedisSettings(url=redis_server.url, max_connections=1, socket_timeout=0.2)
    )
    echo = LuaScript(client, ECHO)
    try:
        await echo(["lua:count"], ["warm"])
        await admin.execute_command("CLIENT", "PAUSE", "600", "ALL")
        with pytest.raises(redis.exceptions.TimeoutError):
            await echo(["lua:count"], ["too late"])
        await asyncio.sleep(0.6)  # Redis answers the paused call now, to a closed socket
        assert await echo(["lua:count"], ["mine"]) == b"mine"
        await admin.execute_command("CLIENT", "PAUSE", "600", "ALL")
        with pytest.raises(DependencyUnavailable) as raised, redis_errors():
            await echo(["lua:count"], ["too late again"])
        assert raised.value.metadata == {"dependency": "redis"}
    finally:
        await client.aclose()


async def test_queued_callers_keep_their_turn_and_every_connection_comes_back(
    single: aioredis.Redis,
) -> None:
    finished: list[str] = []

    async def call(name: str) -> None:
        assert await single.echo(name) == name.encode()
        finished.append(name)

    holder = asyncio.create_task(single.blpop(["lua:never"], timeout=0.3))
    await asyncio.sleep(0.05)  # the holder has the only connection
    first = asyncio.create_task(call("first"))
    await asyncio.sleep(0.05)
    second = asyncio.create_task(call("second"))
    await asyncio.gather(holder, first, second)
    assert finished == ["first", "second"]
    pool = pool_of(single)
    assert (len(pool._available_connections), len(pool._in_use_connections)) == (1, 0)
    assert pool._queued == 0


async def test_a_connection_the_server_closed_is_replaced(
    single: aioredis.Redis, admin: aioredis.Redis
) -> None:
    echo = LuaScript(single, ECHO)
    assert await echo(["lua:count"], ["before"]) == b"before"
    await admin.client_kill_filter(_type="normal", skipme=True)
    await asyncio.sleep(0.05)  # the close reaches the idle connection
    # As with redis-py's own commands, the call that meets the closed socket fails (nothing
    # is retried: mesh.redisconn) and takes the dead connection out; the next one reconnects.
    with pytest.raises(redis.exceptions.ConnectionError):
        await echo(["lua:count"], ["meets the closed socket"])
    assert await echo(["lua:count"], ["after"]) == b"after"
    pool = pool_of(single)
    assert (len(pool._available_connections), len(pool._in_use_connections)) == (1, 0)


async def test_many_concurrent_calls_with_cancellations_each_get_their_own_reply(
    redis_server: RedisServer,
) -> None:
    client = connect_redis(RedisSettings(url=redis_server.url, max_connections=4))
    echo = LuaScript(client, ECHO)
    try:
        for round_ in range(5):
            calls = [
                asyncio.create_task(echo(["lua:count"], [f"{round_}-{n}"])) for n in range(100)
            ]
            await asyncio.sleep(0)
            for victim in calls[::7]:
                victim.cancel()
            replies = await asyncio.gather(*calls, return_exceptions=True)
            for n, reply in enumerate(replies):
                if not isinstance(reply, asyncio.CancelledError):
                    assert reply == f"{round_}-{n}".encode()
        pool = pool_of(client)
        assert len(pool._in_use_connections) == 0
        assert pool._queued == 0
    finally:
        await client.aclose()
