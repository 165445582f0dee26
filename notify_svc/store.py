"""Notifications in Redis: the record, the request it came from, idempotency, CAS updates,
and delivery claims (one delivery at a time per notification, across replicas)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable

import redis.asyncio as aioredis

from mesh.errors import Aborted, NotFound, OpsmeshError
from mesh.redisconn import redis_errors
from opsmesh.notify.v1 import notify_pb2

log = logging.getLogger("opsmesh.notify")

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

# A claim is a key holding its holder's token, with a lease (PX) the holder renews.
_CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return -1 end
return redis.call('PTTL', KEYS[1])
"""

_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
"""

_ATTEMPTS = 32


class NotificationStore:
    def __init__(self, client: aioredis.Redis, *, key_prefix: str, retention_ms: int) -> None:
        self._redis = client
        self._prefix = key_prefix
        self._retention_ms = retention_ms
        self._create = client.register_script(_CREATE)
        self._cas = client.register_script(_CAS)
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

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

    @contextlib.asynccontextmanager
    async def claimed(
        self, org_id: str, notification_id: str, *, lease: float
    ) -> AsyncIterator[None]:
        """Holds the delivery claim of a notification, renewed every third of ``lease``.

        ABORTED (with RetryInfo: when the claim runs out) while another delivery holds it.
        Should this process die, the claim lapses after ``lease`` and a redelivery may go on.
        """
        key = f"{self._prefix}claim:{len(org_id)}:{org_id}:{notification_id}"
        token, lease_ms = uuid.uuid4().hex, max(1, int(lease * 1000))
        with redis_errors():
            remaining = int(await self._claim(keys=[key], args=[token, lease_ms]))
        if remaining != -1:
            raise Aborted(
                f"notification {notification_id} is being delivered by another call; "
                "try again later",
                retry_after=max(remaining, 100) / 1000,
            )
        done = asyncio.Event()
        renewing = asyncio.create_task(self._keep_renewing(key, token, lease_ms, done))
        try:
            yield
        finally:
            done.set()
            renewing.cancel()
            await asyncio.gather(renewing, return_exceptions=True)
            await self._let_go(key, token)

    async def _keep_renewing(
        self, key: str, token: str, lease_ms: int, done: asyncio.Event
    ) -> None:
        # `done` as well as cancel(): on Python 3.11 a cancel that lands while redis-py's own
        # socket timeout expires comes out as a TimeoutError, which would look like a failed
        # renewal and keep this loop (and the claim) alive forever.
        while not done.is_set():
            await asyncio.sleep(lease_ms / 3000)
            try:
                with redis_errors():
                    held = await self._renew(keys=[key], args=[token, lease_ms])
            except OpsmeshError as error:
                if not done.is_set():
                    log.warning("could not renew the delivery claim %s: %s", key, error.message)
                continue
            if not held:
                log.warning("lost the delivery claim %s (it lapsed); a redelivery may resend", key)
                return

    async def _let_go(self, key: str, token: str) -> None:
        try:
            with redis_errors():
                await self._release(keys=[key], args=[token])
        except OpsmeshError as error:
            # The outcome is recorded already: the claim just lapses after its lease.
            log.warning("could not release the delivery claim %s: %s", key, error.message)


def new_notification_id() -> str:
    return str(uuid.uuid4())
