"""Sessions in Redis, with atomic owner checks, sliding TTLs and compare-and-set.

Layout (``P`` is the key prefix):

* ``P s:<id>`` — a hash: ``user``, ``org``, ``title``, ``ctx`` (the context as a
  serialized ``google.protobuf.Struct``), ``size``, ``ver``, ``created``,
  ``updated`` (ms since the epoch), ``ttl`` (ms), ``member``. The key's own TTL
  is the session's expiry; every use slides it.
* ``P u:<len(org)>:<org>:<user>`` — the owner's index, a sorted set with equal
  scores ordered by member ``<inverted order ms>:<id>`` so lexicographic order
  is newest first and page cursors are exact. The order ms is the creation
  time, nudged by the create script to stay strictly below the owner's newest
  member, so sessions created within one millisecond still list newest first.
  Expired sessions leave stale members behind; listings prune them as they
  meet them.

Every operation that checks ownership and changes state is one Lua script, so
no other client can interleave between the check and the change.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from google.protobuf import struct_pb2

from mesh.context import Principal
from mesh.redisconn import LuaScript, redis_errors

_MAX_MS = 10**13  # far beyond any created timestamp in ms (year 2286)

# ARGV[8] is the inverted creation ms; the member takes the smaller of it and one below the
# owner's newest member, so creation order is strict even within one millisecond.
_CREATE = """
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[9]) then return 0 end
local order = tonumber(ARGV[8])
local newest = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
if newest then
  local newest_order = tonumber(string.sub(newest, 1, 13))
  if newest_order and order >= newest_order then order = newest_order - 1 end
end
local member = string.format('%013d', order) .. ':' .. ARGV[11]
redis.call('HSET', KEYS[1], 'user', ARGV[1], 'org', ARGV[2], 'title', ARGV[3], 'ctx', ARGV[4],
  'size', ARGV[5], 'ver', 1, 'created', ARGV[6], 'updated', ARGV[6], 'ttl', ARGV[7],
  'member', member)
redis.call('PEXPIRE', KEYS[1], ARGV[7])
redis.call('ZADD', KEYS[2], 0, member)
redis.call('PEXPIRE', KEYS[2], ARGV[10])
return 1
"""

# Returns the session's fields (owner checked) after sliding its expiry; nil if not the caller's.
_GET_AND_TOUCH = """
local h = redis.call('HMGET', KEYS[1], 'user', 'org', 'title', 'ver', 'created', 'updated',
  'ttl', 'size', ARGV[5])
if not h[1] or h[1] ~= ARGV[1] or h[2] ~= ARGV[2] then return false end
if ARGV[3] ~= '' then
  h[7] = ARGV[3]
  redis.call('HSET', KEYS[1], 'ttl', ARGV[3])
end
redis.call('PEXPIRE', KEYS[1], h[7])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return h
"""

# Compare-and-set of the context. Returns {1, version, ttl, title, created} on success,
# {0} when the session is not the caller's, {-1, version} when the version moved on.
_SET_CONTEXT = """
local h = redis.call('HMGET', KEYS[1], 'user', 'org', 'ver', 'ttl', 'title', 'created')
if not h[1] or h[1] ~= ARGV[1] or h[2] ~= ARGV[2] then return {0} end
if ARGV[3] ~= '' and h[3] ~= ARGV[3] then return {-1, tonumber(h[3])} end
local version = tonumber(h[3]) + 1
redis.call('HSET', KEYS[1], 'ctx', ARGV[4], 'size', ARGV[5], 'ver', version, 'updated', ARGV[6])
redis.call('PEXPIRE', KEYS[1], h[4])
redis.call('PEXPIRE', KEYS[2], ARGV[7])
return {1, version, h[4], h[5], h[6]}
"""

_EXPIRE = """
local h = redis.call('HMGET', KEYS[1], 'user', 'org', 'member')
if not h[1] or h[1] ~= ARGV[1] or h[2] ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], h[3])
return 1
"""


@dataclass(frozen=True, slots=True)
class StoredSession:
    id: str
    user_id: str
    org_id: str
    title: str
    context: struct_pb2.Struct | None
    """None when the context was not read (basic listings)."""
    context_size: int
    version: int
    created_ms: int
    updated_ms: int
    ttl_ms: int
    expires_ms: int


class SessionNotFound(Exception):
    """The session does not exist, has expired, or is not the caller's."""


class VersionConflict(Exception):
    def __init__(self, current_version: int) -> None:
        super().__init__(f"session is at version {current_version}")
        self.current_version = current_version


class TooManySessions(Exception):
    pass


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class SessionStore:
    def __init__(
        self,
        client: aioredis.Redis,
        *,
        key_prefix: str,
        max_ttl_ms: int,
        max_sessions_per_user: int,
    ) -> None:
        self._redis = client
        self._prefix = key_prefix
        self._index_ttl_ms = max_ttl_ms
        self._max_sessions = max_sessions_per_user
        self._create = LuaScript(client, _CREATE)
        self._get_and_touch = LuaScript(client, _GET_AND_TOUCH)
        self._set_context = LuaScript(client, _SET_CONTEXT)
        self._expire = LuaScript(client, _EXPIRE)

    def _session_key(self, session_id: str) -> str:
        return f"{self._prefix}s:{session_id}"

    def _index_key(self, owner: Principal) -> str:
        return f"{self._prefix}u:{len(owner.org_id)}:{owner.org_id}:{owner.user_id}"

    async def ping(self) -> None:
        await self._redis.ping()

    async def create(
        self, owner: Principal, *, title: str, context: struct_pb2.Struct, ttl_ms: int
    ) -> StoredSession:
        session_id = str(uuid.uuid4())
        now = _now_ms()
        blob = context.SerializeToString()
        with redis_errors():
            created = await self._create(
                keys=[self._session_key(session_id), self._index_key(owner)],
                args=[
                    owner.user_id,
                    owner.org_id,
                    title,
                    blob,
                    len(blob),
                    now,
                    ttl_ms,
                    _MAX_MS - now,
                    self._max_sessions,
                    self._index_ttl_ms,
                    session_id,
                ],
            )
        if not created:
            raise TooManySessions()
        return StoredSession(
            id=session_id,
            user_id=owner.user_id,
            org_id=owner.org_id,
            title=title,
            context=context,
            context_size=len(blob),
            version=1,
            created_ms=now,
            updated_ms=now,
            ttl_ms=ttl_ms,
            expires_ms=now + ttl_ms,
        )

    async def get(
        self,
        owner: Principal,
        session_id: str,
        *,
        new_ttl_ms: int | None = None,
        with_context: bool = True,
    ) -> StoredSession:
        """Reads a session of ``owner`` and slides its expiry (with a new TTL, if given)."""
        with redis_errors():
            fields = await self._get_and_touch(
                keys=[self._session_key(session_id), self._index_key(owner)],
                args=[
                    owner.user_id,
                    owner.org_id,
                    "" if new_ttl_ms is None else new_ttl_ms,
                    self._index_ttl_ms,
                    "ctx" if with_context else "size",
                ],
            )
        if not fields:
            raise SessionNotFound()
        return _from_fields(session_id, fields, with_context=with_context, touched_at=_now_ms())

    async def set_context(
        self,
        owner: Principal,
        session_id: str,
        context: struct_pb2.Struct,
        *,
        expected_version: int | None,
    ) -> StoredSession:
        """Stores ``context`` if the session is still at ``expected_version`` (any if None)."""
        blob = context.SerializeToString()
        now = _now_ms()
        with redis_errors():
            result = await self._set_context(
                keys=[self._session_key(session_id), self._index_key(owner)],
                args=[
                    owner.user_id,
                    owner.org_id,
                    "" if expected_version is None else expected_version,
                    blob,
                    len(blob),
                    now,
                    self._index_ttl_ms,
                ],
            )
        if result[0] == 0:
            raise SessionNotFound()
        if result[0] == -1:
            raise VersionConflict(int(result[1]))
        ttl_ms = int(result[2])
        return StoredSession(
            id=session_id,
            user_id=owner.user_id,
            org_id=owner.org_id,
            title=_text(result[3]),
            context=context,
            context_size=len(blob),
            version=int(result[1]),
            created_ms=int(result[4]),
            updated_ms=now,
            ttl_ms=ttl_ms,
            expires_ms=now + ttl_ms,
        )

    async def expire(self, owner: Principal, session_id: str) -> None:
        with redis_errors():
            removed = await self._expire(
                keys=[self._session_key(session_id), self._index_key(owner)],
                args=[owner.user_id, owner.org_id],
            )
        if not removed:
            raise SessionNotFound()

    async def list(
        self, owner: Principal, *, after: str | None, limit: int, with_context: bool
    ) -> tuple[list[StoredSession], str | None]:
        """Up to ``limit`` live sessions of ``owner`` after cursor ``after``; the next cursor."""
        index = self._index_key(owner)
        wanted = (
            "user",
            "org",
            "title",
            "ver",
            "created",
            "updated",
            "ttl",
            "size",
            "ctx" if with_context else "size",
        )
        sessions: list[StoredSession] = []
        last_member = ""
        start = f"({after}" if after else "-"
        with redis_errors():
            while len(sessions) < limit:
                batch = limit - len(sessions) + 1
                members = [
                    _text(m)
                    for m in await self._redis.zrange(
                        index, start, "+", bylex=True, offset=0, num=batch
                    )
                ]
                if not members:
                    return sessions, None
                async with self._redis.pipeline(transaction=False) as pipe:
                    for member in members:
                        pipe.hmget(self._session_key(member.partition(":")[2]), wanted)
                        pipe.pttl(self._session_key(member.partition(":")[2]))
                    replies = await pipe.execute()
                stale: list[str] = []
                has_more = False
                for position, member in enumerate(members):
                    fields, pttl = replies[2 * position], replies[2 * position + 1]
                    if (
                        not fields[0]
                        or _text(fields[0]) != owner.user_id
                        or _text(fields[1]) != owner.org_id
                    ):
                        stale.append(member)
                        continue
                    if len(sessions) == limit:
                        has_more = True
                        break
                    sessions.append(
                        _from_fields(
                            member.partition(":")[2],
                            fields,
                            with_context=with_context,
                            touched_at=None,
                            pttl=int(pttl),
                        )
                    )
                    last_member = member
                if stale:
                    await self._redis.zrem(index, *stale)
                if has_more:
                    return sessions, last_member
                if len(members) < batch:
                    return sessions, None
                start = f"({members[-1]}"
        return sessions, last_member or None


def _from_fields(
    session_id: str,
    fields: Sequence[Any],
    *,
    with_context: bool,
    touched_at: int | None,
    pttl: int | None = None,
) -> StoredSession:
    ttl_ms = int(fields[6])
    context: struct_pb2.Struct | None = None
    if with_context:
        context = struct_pb2.Struct.FromString(fields[8] or b"")
    # A touch just reset the TTL; a listing reads the remaining TTL instead.
    expires = touched_at + ttl_ms if touched_at is not None else _now_ms() + max(pttl or 0, 0)
    return StoredSession(
        id=session_id,
        user_id=_text(fields[0]),
        org_id=_text(fields[1]),
        title=_text(fields[2] or b""),
        context=context,
        context_size=int(fields[7] or 0),
        version=int(fields[3]),
        created_ms=int(fields[4]),
        updated_ms=int(fields[5]),
        ttl_ms=ttl_ms,
        expires_ms=expires,
    )
