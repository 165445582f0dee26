"""Idempotent chat turns: the same ``client_message_id`` in a session is answered once.

The first request with an id claims it and runs; when its answer is complete the
claim keeps a replay of the answer's events, so a retry gets the same answer
again without asking the model twice. A retry while the first one still runs is
refused with ALREADY_EXISTS naming the running generation; a turn that failed or
was cancelled before its answer was whole may be retried.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from google.protobuf import json_format

from mesh.context import Principal
from mesh.redisconn import redis_errors
from opsmesh.chat.v1 import chat_pb2

# A retry comes within minutes; a day covers a laptop waking up.
_KEEP_SECONDS = 24 * 3600


# KEYS[1] the turn; ARGV: generation id, user message id, seconds to keep.
# A new or failed turn is claimed (a failed one keeps its user message id: the question is in
# the history already); otherwise the earlier record is returned as it is.
_CLAIM = """
local raw = redis.call('GET', KEYS[1])
local record
if raw then
  record = cjson.decode(raw)
  if record.state ~= 'failed' then return cjson.encode({claimed = false, record = record}) end
else
  record = {user_message_id = ARGV[2], fresh = true}
end
record.state = 'running'
record.generation_id = ARGV[1]
redis.call('SET', KEYS[1], cjson.encode(record), 'EX', tonumber(ARGV[3]))
return cjson.encode({claimed = true, record = record})
"""


@dataclass(frozen=True)
class Claim:
    claimed: bool
    record: dict[str, Any]

    @property
    def user_message_id(self) -> str:
        return str(self.record["user_message_id"])

    @property
    def question_recorded(self) -> bool:
        """The user's message is in the history already (a retry of a failed turn)."""
        return self.claimed and not self.record.get("fresh", False)


class Turns:
    def __init__(self, client: aioredis.Redis, *, prefix: str = "opsmesh:chat:") -> None:
        self._redis = client
        self._prefix = prefix
        self._claim = client.register_script(_CLAIM)

    def _key(self, owner: Principal, session_id: str, client_message_id: str) -> str:
        return f"{self._prefix}turn:{owner.org_id}:{owner.user_id}:{session_id}:{client_message_id}"

    async def claim(
        self,
        owner: Principal,
        session_id: str,
        client_message_id: str,
        *,
        generation_id: str,
        user_message_id: str,
    ) -> Claim:
        key = self._key(owner, session_id, client_message_id)
        with redis_errors():
            raw = await self._claim(
                keys=[key], args=[generation_id, user_message_id, _KEEP_SECONDS]
            )
        answer = json.loads(raw)
        return Claim(bool(answer["claimed"]), dict(answer["record"]))

    async def complete(
        self,
        owner: Principal,
        session_id: str,
        client_message_id: str,
        claim: Claim,
        events: list[chat_pb2.StreamChatResponse],
    ) -> None:
        record = {
            "generation_id": claim.record["generation_id"],
            "user_message_id": claim.user_message_id,
            "state": "done",
            "events": [json_format.MessageToDict(event) for event in events],
        }
        with redis_errors():
            await self._redis.set(
                self._key(owner, session_id, client_message_id),
                json.dumps(record),
                ex=_KEEP_SECONDS,
            )

    async def fail(
        self, owner: Principal, session_id: str, client_message_id: str, claim: Claim
    ) -> None:
        """Marks a turn that ended without a whole answer, so a retry runs it again."""
        record = {
            "generation_id": claim.record["generation_id"],
            "user_message_id": claim.user_message_id,
            "state": "failed",
        }
        with redis_errors():
            await self._redis.set(
                self._key(owner, session_id, client_message_id),
                json.dumps(record),
                ex=_KEEP_SECONDS,
            )


def replay(record: dict[str, Any]) -> list[chat_pb2.StreamChatResponse]:
    return [
        json_format.ParseDict(event, chat_pb2.StreamChatResponse())
        for event in record.get("events", [])
    ]
