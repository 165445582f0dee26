"""RedisBatch against a real Redis: one round trip, lost scripts, error replies, cancellation."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.exceptions

from devtools.servers import RedisServer
from mesh.redisbatch import RedisBatch
from mesh.redisconn import LuaScript, RedisSettings, connect_redis

_COUNT = "return redis.call('INCRBY', KEYS[1], ARGV[1])"


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[object]:
    redis = connect_redis(RedisSettings(url=redis_server.url, max_connections=4))
    yield redis
    await redis.aclose()


def key() -> str:
    return f"test:batch:{uuid.uuid4().hex}"


async def calls(client) -> dict[str, int]:
    return {name: stat["calls"] for name, stat in (await client.info("commandstats")).items()}


async def test_commands_and_scripts_go_in_one_write_and_answer_in_order(client) -> None:
    counter, plain = key(), key()
    batch = RedisBatch(client)
    batch.command("SET", plain, "v", "PX", 60_000)
    batch.script(LuaScript(client, _COUNT), [counter], [5])
    batch.command("GET", plain)
    assert len(batch) == 3
    # The connection is open and the script loaded: the count below is the batch's own commands.
    await client.script_load(_COUNT)
    before = await calls(client)
    assert await batch.run() == [b"OK", 5, b"v"]  # raw replies
    after = await calls(client)
    ran = {name: after[name] - before.get(name, 0) for name in after}
    assert {name: n for name, n in ran.items() if n and name != "cmdstat_info"} == {
        "cmdstat_set": 1,
        "cmdstat_evalsha": 1,
        "cmdstat_incrby": 1,  # inside the script
        "cmdstat_get": 1,
    }  # and no SCRIPT EXISTS, which redis-py's pipeline sends on every run
    assert await RedisBatch(client).run() == []


async def test_a_script_redis_lost_is_loaded_and_run_exactly_once(client) -> None:
    counter = key()
    script = LuaScript(client, _COUNT)
    await client.script_flush()
    batch = RedisBatch(client)
    batch.script(script, [counter], [1])
    batch.command("INCRBY", counter, 10)
    batch.script(script, [counter], [100])
    replies = await batch.run()
    # Both script calls answered NOSCRIPT (nothing ran) and ran once each after the load.
    assert replies[1] == 10
    assert sorted(replies) == [10, 11, 111]
    assert int(await client.get(counter)) == 111


async def test_an_error_reply_raises_after_every_reply_was_read(client) -> None:
    text, after = key(), key()
    await client.set(text, "not a number")
    batch = RedisBatch(client)
    batch.command("INCR", text)
    batch.command("SET", after, "done")
    with pytest.raises(redis.exceptions.ResponseError):
        await batch.run()
    assert await client.get(after) == b"done"  # not a transaction: the rest ran
    # The connection went back clean: the next batch on it reads its own replies.
    again = RedisBatch(client)
    again.command("GET", after)
    assert await again.run() == [b"done"]


async def test_a_batch_cancelled_mid_exchange_leaves_no_reply_behind(client) -> None:
    slow = RedisBatch(client)
    slow.script(
        LuaScript(
            client,
            "local t = redis.call('TIME') while true do "
            "local n = redis.call('TIME') if (n[1] - t[1]) * 1000000 + n[2] - t[2] > 200000 "
            "then return 1 end end",
        ),
        [key()],
    )
    task = asyncio.create_task(slow.run())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Every connection the pool hands out now answers its own command, not the late reply.
    for _ in range(8):
        probe = RedisBatch(client)
        marker = uuid.uuid4().hex
        probe.command("ECHO", marker)
        assert await probe.run() == [marker.encode()]
