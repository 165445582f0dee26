"""The prompt's earlier turns come from Redis on the hot path, ClickHouse when Redis cannot tell."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import redis.asyncio as aioredis

from chat_svc.recent import EPOCH_KEY, RecentTurns, Turn
from devtools.servers import RedisServer
from mesh.redisbatch import RedisBatch
from opsmesh.chat.v1 import chat_pb2 as pb
from tests.helpers import assert_eventually
from tests.test_chat import ChatStack, collect, new_session
from tests.test_chat import chat as chat  # the fixture

_TURNS = "opsmesh:chat:turns:*"


async def ask(stack: ChatStack, session_id: str, text: str) -> None:
    await collect(
        stack.stub.StreamChat(
            pb.StreamChatRequest(session_id=session_id, message=text), metadata=stack.who
        )
    )


async def run(queue: Callable[..., None], client: aioredis.Redis, *args: Any, **kw: Any) -> None:
    """What ``queue`` puts in a batch, run on its own."""
    batch = RedisBatch(client)
    queue(batch, *args, **kw)
    await batch.run()


def prompt_of_last_request(stack: ChatStack) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in stack.ollama.requests[-1].body["messages"]]


async def test_an_immediate_follow_up_carries_the_turn_before_it(chat: ChatStack) -> None:
    # The history writer batches into ClickHouse; the next question must not wait for it.
    session_id = await new_session(chat)
    await ask(chat, session_id, "first question")
    await ask(chat, session_id, "second question")
    assert prompt_of_last_request(chat) == [
        ("user", "first question"),
        ("assistant", "Hello, world!"),
        ("user", "second question"),
    ]


async def test_turns_only_in_the_durable_history_are_read_from_it_once(
    chat: ChatStack, redis_server: RedisServer
) -> None:
    session_id = await new_session(chat)
    await ask(chat, session_id, "remember this")

    async def stored() -> None:
        page = await chat.stub.GetHistory(
            pb.GetHistoryRequest(session_id=session_id), metadata=chat.who
        )
        assert len(page.messages) == 2

    await assert_eventually(stored)
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        # Redis lost its data (or the turns predate the cache): nothing tells the session is new.
        keys = [key async for key in client.scan_iter(match=_TURNS)]
        assert keys
        await client.delete(*keys, EPOCH_KEY)
        await ask(chat, session_id, "what did I say?")
        assert prompt_of_last_request(chat) == [
            ("user", "remember this"),
            ("assistant", "Hello, world!"),
            ("user", "what did I say?"),
        ]
        # The list was seeded from ClickHouse and has both new turns appended.
        await ask(chat, session_id, "and then?")
        assert [role for role, _ in prompt_of_last_request(chat)] == [
            "user",
            "assistant",
            "user",
            "assistant",
            "user",
        ]
    finally:
        await client.aclose()


async def test_a_new_session_is_known_empty_only_within_the_cache_window(
    redis_server: RedisServer,
) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    recent = RecentTurns(client, keep=2, ttl=3600)
    try:
        await recent.start()
        turns, epoch = await recent.read("org", "user", "no-such-session")
        assert turns is None
        assert epoch is not None
        now = datetime.now(UTC)
        assert recent.covers(now, epoch)
        assert not recent.covers(now - timedelta(hours=2), epoch)  # its key may have expired
        assert not recent.covers(datetime.fromtimestamp(epoch - 1, UTC), epoch)  # before cache
        assert not recent.covers(now, None)  # Redis lost the epoch: it cannot tell
    finally:
        await client.aclose()


async def test_the_list_keeps_the_newest_turns_and_appends_only_to_a_known_list(
    redis_server: RedisServer,
) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    recent = RecentTurns(client, keep=2, ttl=3600)
    try:
        lost = Turn("user", "lost: nobody knows this list")
        await run(recent.append, client, "o", "u", "s", lost)
        assert (await recent.read("o", "u", "s"))[0] is None
        await run(recent.seed, client, "o", "u", "s", [])
        for n in range(3):
            await run(recent.append, client, "o", "u", "s", Turn("user", f"é/{n}"))
        turns, _ = await recent.read("o", "u", "s")
        assert turns == [Turn("user", "é/1"), Turn("user", "é/2")]
        assert (await recent.read("o", "other-user", "s"))[0] is None
    finally:
        await client.aclose()


async def test_a_seeded_append_starts_a_missing_list_and_joins_an_existing_one(
    redis_server: RedisServer,
) -> None:
    # The first question of a session starts its list in the append's own round trip.
    client = aioredis.Redis.from_url(redis_server.url)
    recent = RecentTurns(client, keep=3, ttl=3600)
    try:
        earlier = [Turn("user", "q0"), Turn("assistant", "a0"), Turn("user", "q1")]
        await run(recent.append, client, "o", "u", "seeded", Turn("assistant", "a1"), seed=earlier)
        turns, _ = await recent.read("o", "u", "seeded")
        assert turns == [Turn("assistant", "a0"), Turn("user", "q1"), Turn("assistant", "a1")]
        # A list someone started meanwhile wins over a (stale) seed.
        await run(recent.append, client, "o", "u", "seeded", Turn("user", "q2"), seed=[])
        turns, _ = await recent.read("o", "u", "seeded")
        assert turns == [Turn("user", "q1"), Turn("assistant", "a1"), Turn("user", "q2")]
        await run(recent.append, client, "o", "u", "empty", Turn("user", "first"), seed=[])
        assert (await recent.read("o", "u", "empty"))[0] == [Turn("user", "first")]
    finally:
        await client.aclose()
