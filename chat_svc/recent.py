"""A session's newest turns in Redis: the prompt's context without a ClickHouse read.

ClickHouse keeps the durable history (GetHistory reads it); the history writer
batches into it, so it is neither cheap nor up to the second on the hot path.
Every message recorded is also appended to one Redis key per caller and session,
capped at the prompt's turn count and expiring ``ttl`` after the last message.

A missing key is ambiguous: a session that never had a message, or turns that
expired or were written before this cache existed. The epoch key (when the
cache began; lost with Redis' data) settles it: a session created after the
epoch and less than ``ttl`` ago would still have its key, so it has no turns;
any other miss reads ClickHouse once and seeds the key.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis.asyncio as aioredis

from mesh.redisbatch import RedisBatch
from mesh.redisconn import LuaScript, redis_errors

_PREFIX = "opsmesh:chat:"
EPOCH_KEY = f"{_PREFIX}turns-since"

# KEYS[1] the turns; ARGV: one turn (JSON), turns to keep, milliseconds to keep them, and
# optionally the earlier turns (JSON list) to start a missing list with.
# Appends only to a known list: a missing one without ARGV[4] is re-read from ClickHouse when
# next needed.
_APPEND = """
local raw = redis.call('GET', KEYS[1])
local turns
if raw then
  turns = cjson.decode(raw)
elseif ARGV[4] then
  turns = cjson.decode(ARGV[4])
else
  return 0
end
table.insert(turns, cjson.decode(ARGV[1]))
while #turns > tonumber(ARGV[2]) do table.remove(turns, 1) end
redis.call('SET', KEYS[1], cjson.encode(turns), 'PX', tonumber(ARGV[3]))
return 1
"""


@dataclass(frozen=True)
class Turn:
    role: str
    content: str


class RecentTurns:
    """The newest ``keep`` turns of each (org, user, session), oldest first."""

    def __init__(self, client: aioredis.Redis, *, keep: int, ttl: float) -> None:
        self._redis = client
        self._keep = keep
        self._ttl_ms = int(ttl * 1000)
        self._append = LuaScript(client, _APPEND)

    @staticmethod
    def _key(org_id: str, user_id: str, session_id: str) -> str:
        return f"{_PREFIX}turns:{org_id}:{user_id}:{session_id}"

    async def start(self) -> None:
        """Marks when the cache began, unless an earlier start did."""
        with redis_errors():
            await self._redis.set(EPOCH_KEY, str(int(time.time() * 1000)), nx=True)

    async def read(
        self, org_id: str, user_id: str, session_id: str
    ) -> tuple[list[Turn] | None, float | None]:
        """The cached turns (None: not cached) and the epoch in seconds (None: unknown)."""
        batch = RedisBatch(self._redis)  # redis-py's generic command path costs more CPU
        batch.command("MGET", self._key(org_id, user_id, session_id), EPOCH_KEY)
        with redis_errors():
            ((raw, epoch),) = await batch.run()
        turns = None if raw is None else [Turn(t["role"], t["content"]) for t in json.loads(raw)]
        return turns, (int(epoch) / 1000 if epoch is not None else None)

    def covers(self, created_at: datetime, epoch: float | None) -> bool:
        """Whether a session created at ``created_at`` would have a key if it had turns."""
        created = created_at.timestamp()
        young = time.time() - created < self._ttl_ms / 1000
        return epoch is not None and created >= epoch and young

    def seed(
        self, batch: RedisBatch, org_id: str, user_id: str, session_id: str, turns: list[Turn]
    ) -> None:
        """Starts the session's list (if no one did meanwhile) from what is known, in ``batch``."""
        payload = json.dumps([_plain(t) for t in turns[-self._keep :]])
        key = self._key(org_id, user_id, session_id)
        batch.command("SET", key, payload, "PX", self._ttl_ms, "NX")

    def append(
        self,
        batch: RedisBatch,
        org_id: str,
        user_id: str,
        session_id: str,
        turn: Turn,
        *,
        seed: list[Turn] | None = None,
    ) -> None:
        """Appends ``turn`` to the session's list, in ``batch``; with ``seed``, a missing list
        starts as ``seed`` first (what :meth:`seed` does, in the same command)."""
        args: list[str | int] = [json.dumps(_plain(turn)), self._keep, self._ttl_ms]
        if seed is not None:
            args.append(json.dumps([_plain(t) for t in seed[-self._keep :]]))
        batch.script(self._append, [self._key(org_id, user_id, session_id)], args)


def _plain(turn: Turn) -> dict[str, Any]:
    return {"role": turn.role, "content": turn.content}
