"""Approvals of state-changing tool calls, decided from any replica.

A pending approval is a Redis record (owner, session, what would run, deadline)
that exactly one decision moves out of ``pending``: the user's approve/reject
through ``DecideToolCall`` on any replica, or expiry at the deadline, whichever
comes first (one Lua script, so a late approval can never race an expiry). The
waiting generation learns of a decision through a Redis message and re-reads
the record, so a decision is never lost if the message is. The records of a
session are indexed, so a client that reconnects can list what still waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from chat_svc.stops import StopSignals
from mesh.context import Principal
from mesh.redisconn import redis_errors

# KEYS[1] approval record; ARGV: org, user, new state, reason, now (ms).
# Returns: 1 decided, 0 no such record, -1 not the caller's, 2 decided before (or expired).
_DECIDE = """
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local record = cjson.decode(raw)
if record.org_id ~= ARGV[1] or record.user_id ~= ARGV[2] then return -1 end
if record.state ~= 'pending' then return 2 end
if ARGV[3] ~= 'expired' and tonumber(ARGV[5]) > record.deadline_ms then
  record.state = 'expired'
  redis.call('SET', KEYS[1], cjson.encode(record), 'KEEPTTL')
  return 2
end
record.state = ARGV[3]
record.reason = ARGV[4]
redis.call('SET', KEYS[1], cjson.encode(record), 'KEEPTTL')
return 1
"""

# How long a decided record stays readable (to answer a late DecideToolCall precisely).
_KEEP_SECONDS = 3600


@dataclass(frozen=True, kw_only=True)
class PendingApproval:
    generation_id: str
    tool_call_id: str
    session_id: str
    name: str
    arguments: dict[str, Any]
    description: str
    deadline_ms: int


@dataclass(frozen=True)
class Decision:
    state: str
    """approved, rejected or expired."""
    reason: str = ""


class Approvals:
    def __init__(
        self, client: aioredis.Redis, signals: StopSignals, *, prefix: str = "opsmesh:chat:"
    ) -> None:
        self._redis = client
        self._signals = signals
        self._prefix = prefix
        self._decide = client.register_script(_DECIDE)

    def _key(self, generation_id: str, tool_call_id: str) -> str:
        return f"{self._prefix}approval:{generation_id}:{tool_call_id}"

    def _index(self, owner: Principal, session_id: str) -> str:
        return f"{self._prefix}approvals:{owner.org_id}:{owner.user_id}:{session_id}"

    async def request(self, owner: Principal, approval: PendingApproval) -> None:
        record = {
            "org_id": owner.org_id,
            "user_id": owner.user_id,
            "state": "pending",
            "reason": "",
            "generation_id": approval.generation_id,
            "tool_call_id": approval.tool_call_id,
            "session_id": approval.session_id,
            "name": approval.name,
            "arguments": approval.arguments,
            "description": approval.description,
            "deadline_ms": approval.deadline_ms,
        }
        ttl_ms = max(1000, approval.deadline_ms - _now_ms()) + _KEEP_SECONDS * 1000
        key = self._key(approval.generation_id, approval.tool_call_id)
        index = self._index(owner, approval.session_id)
        with redis_errors():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(key, json.dumps(record), px=ttl_ms)
                pipe.zadd(index, {key: approval.deadline_ms})
                pipe.pexpire(index, ttl_ms)
                await pipe.execute()

    async def decide(
        self, caller: Principal, generation_id: str, tool_call_id: str, state: str, reason: str
    ) -> int:
        """1 decided, 0 unknown, -1 someone else's, 2 no longer pending."""
        key = self._key(generation_id, tool_call_id)
        with redis_errors():
            outcome = int(
                await self._decide(
                    keys=[key], args=[caller.org_id, caller.user_id, state, reason, _now_ms()]
                )
            )
        if outcome == 1:
            await self._signals.publish(self._signals.decision_channel(generation_id, tool_call_id))
        return outcome

    async def wait(self, owner: Principal, approval: PendingApproval) -> Decision:
        """The decision, or ``expired`` at the deadline; re-reads the record on every wake-up."""
        channel = self._signals.decision_channel(approval.generation_id, approval.tool_call_id)
        woken = self._signals.listen(channel)
        key = self._key(approval.generation_id, approval.tool_call_id)
        try:
            await self.request(owner, approval)
            while True:
                decision = await self._read(key)
                if decision is not None:
                    return decision
                remaining = approval.deadline_ms / 1000 - time.time()
                if remaining <= 0:
                    await self.decide(
                        owner, approval.generation_id, approval.tool_call_id, "expired", ""
                    )
                    continue
                woken.clear()
                # Re-read now and then even without a message: pub/sub is at most once.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), min(remaining, 5.0))
        finally:
            self._signals.forget(channel)
            with redis_errors():
                await self._redis.zrem(self._index(owner, approval.session_id), key)

    async def _read(self, key: str) -> Decision | None:
        with redis_errors():
            raw = await self._redis.get(key)
        if raw is None:
            return Decision("expired", "the approval request was lost")
        record = json.loads(raw)
        if record["state"] == "pending":
            return None
        return Decision(record["state"], record.get("reason", ""))

    async def pending(self, owner: Principal, session_id: str) -> list[PendingApproval]:
        """What still waits for ``owner``'s decision in a session, oldest deadline first."""
        index = self._index(owner, session_id)
        with redis_errors():
            keys: list[Any] = await self._redis.zrangebyscore(index, _now_ms(), "+inf")
            raws: list[Any] = await self._redis.mget(keys) if keys else []
        found = []
        for raw in raws:
            if raw is None:
                continue
            record = json.loads(raw)
            if record["state"] != "pending":
                continue
            found.append(
                PendingApproval(
                    generation_id=record["generation_id"],
                    tool_call_id=record["tool_call_id"],
                    session_id=record["session_id"],
                    name=record["name"],
                    arguments=record["arguments"],
                    description=record["description"],
                    deadline_ms=int(record["deadline_ms"]),
                )
            )
        return found


def _now_ms() -> int:
    return int(time.time() * 1000)
