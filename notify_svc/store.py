"""Notifications in Redis: the record, the request it came from, idempotency, CAS updates."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable

import redis.asyncio as aioredis

from mesh.errors import Aborted, NotFound
from mesh.redisconn import redis_errors
from opsmesh.notify.v1 import notify_pb2

# Creates the record unless the idempotency key already names one: returns the id in force.
_CREATE = """
if ARGV[4] ~= '' then
  local existing = redis.call('GET', KEYS[2])
  if existing then return existing end
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[5])
end
redis.call('HSET', KEYS[1], 'n', ARGV[2], 'req', ARGV[3], 'ver', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return ARGV[1]
"""

_CAS = """
local version = redis.call('HGET', KEYS[1], 'ver')
if not version then return -1 end
if version ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'n', ARGV[2], 'ver', tonumber(version) + 1)
return 1
"""

_ATTEMPTS = 32


class NotificationStore:
    def __init__(self, client: aioredis.Redis, *, key_prefix: str, retention_ms: int) -> None:
        self._redis = client
        self._prefix = key_prefix
        self._retention_ms = retention_ms
        self._create = client.register_script(_CREATE)
        self._cas = client.register_script(_CAS)

    def _key(self, org_id: str, notification_id: str) -> str:
        return f"{self._prefix}n:{len(org_id)}:{org_id}:{notification_id}"

    def _idempotency_key(self, org_id: str, key: str) -> str:
        digest = hashlib.sha256(key.encode()).hexdigest()
        return f"{self._prefix}i:{len(org_id)}:{org_id}:{digest}"

    async def create(
        self, notification: notify_pb2.Notification, request: notify_pb2.SendEmailRequest
    ) -> tuple[notify_pb2.Notification, bool]:
        """Stores a new notification, or returns the one its idempotency key already made."""
        org = notification.org_id
        with redis_errors():
            stored_id = await self._create(
                keys=[
                    self._key(org, notification.id),
                    self._idempotency_key(org, notification.idempotency_key),
                ],
                args=[
                    notification.id,
                    notification.SerializeToString(),
                    request.SerializeToString(),
                    notification.idempotency_key,
                    self._retention_ms,
                ],
            )
        stored_id = stored_id.decode() if isinstance(stored_id, bytes) else str(stored_id)
        if stored_id == notification.id:
            return notification, True
        existing, _ = await self.get(org, stored_id)
        return existing, False

    async def get(
        self, org_id: str, notification_id: str
    ) -> tuple[notify_pb2.Notification, notify_pb2.SendEmailRequest]:
        with redis_errors():
            raw, request = await self._redis.hmget(self._key(org_id, notification_id), ["n", "req"])
        if not isinstance(raw, bytes):
            raise NotFound(f"notification {notification_id} not found")
        return (
            notify_pb2.Notification.FromString(raw),
            notify_pb2.SendEmailRequest.FromString(request if isinstance(request, bytes) else b""),
        )

    async def change(
        self, org_id: str, notification_id: str, mutate: Callable[[notify_pb2.Notification], None]
    ) -> notify_pb2.Notification:
        """Applies ``mutate`` with compare-and-set; re-reads and re-applies on a lost race."""
        key = self._key(org_id, notification_id)
        for _ in range(_ATTEMPTS):
            with redis_errors():
                raw, version = await self._redis.hmget(key, ["n", "ver"])
            if not isinstance(raw, bytes) or version is None:
                raise NotFound(f"notification {notification_id} not found")
            notification = notify_pb2.Notification.FromString(raw)
            mutate(notification)
            notification.updated_at.GetCurrentTime()
            with redis_errors():
                outcome = await self._cas(
                    keys=[key], args=[version, notification.SerializeToString()]
                )
            if outcome == 1:
                return notification
            if outcome == -1:
                raise NotFound(f"notification {notification_id} not found")
        raise Aborted(f"notification {notification_id} kept changing; try again")


def new_notification_id() -> str:
    return str(uuid.uuid4())
