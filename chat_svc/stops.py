"""Signals across replicas: stop requests and tool-call decisions, published on Redis.

Each running generation is registered (owner, with a TTL) so only its owner can
stop it; every replica listens on one pattern subscription and sets the local
event of the channel named in a message (a generation's stop, or the decision on
one of its tool calls, see :mod:`chat_svc.approvals`).
"""

from __future__ import annotations

import asyncio
import json
import logging

import redis.asyncio as aioredis

from mesh.context import Principal
from mesh.redisbatch import RedisBatch
from mesh.redisconn import redis_errors

log = logging.getLogger("opsmesh.stops")


class StopSignals:
    def __init__(self, client: aioredis.Redis, *, prefix: str = "opsmesh:chat:") -> None:
        self._redis = client
        self._prefix = prefix
        self._events: dict[str, asyncio.Event] = {}
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()

    def _owner_key(self, generation_id: str) -> str:
        return f"{self._prefix}gen:{generation_id}"

    def _channel(self, generation_id: str) -> str:
        return f"{self._prefix}stop:{generation_id}"

    def decision_channel(self, generation_id: str, tool_call_id: str) -> str:
        return f"{self._prefix}decision:{generation_id}:{tool_call_id}"

    def listen(self, channel: str) -> asyncio.Event:
        """A local event set when a message arrives on ``channel`` (until :meth:`forget`)."""
        return self._events.setdefault(channel, asyncio.Event())

    def forget(self, channel: str) -> None:
        self._events.pop(channel, None)

    async def publish(self, channel: str) -> int:
        with redis_errors():
            receivers: int = await self._redis.publish(channel, b"1")
        return receivers

    def register(
        self, batch: RedisBatch, generation_id: str, owner: Principal, ttl: float
    ) -> asyncio.Event:
        """Marks a generation as running once ``batch`` has run; the event is set when someone
        stops it."""
        owner_json = json.dumps([owner.org_id, owner.user_id])
        batch.command("SET", self._owner_key(generation_id), owner_json, "PX", int(ttl * 1000))
        return self.listen(self._channel(generation_id))

    def unregister(self, batch: RedisBatch, generation_id: str) -> None:
        """The generation ended (its key goes with ``batch``; if that fails, it expires)."""
        self.forget(self._channel(generation_id))
        batch.command("DEL", self._owner_key(generation_id))

    async def finished(self, generation_id: str) -> None:
        """:meth:`unregister` on its own, best effort."""
        batch = RedisBatch(self._redis)
        self.unregister(batch, generation_id)
        try:
            with redis_errors():
                await batch.run()
        except Exception as error:  # noqa: BLE001 - the key expires by itself
            log.debug("could not unregister generation %s: %s", generation_id, error)

    async def request_stop(self, generation_id: str, caller: Principal) -> bool | None:
        """True if a running generation of ``caller`` was told to stop; None if it is not theirs."""
        with redis_errors():
            owner = await self._redis.get(self._owner_key(generation_id))
            if owner is None:
                return False
            if json.loads(owner) != [caller.org_id, caller.user_id]:
                return None
            receivers = await self._redis.publish(self._channel(generation_id), b"stop")
        return bool(receivers)

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="stop-listener")

    async def wait_listening(self) -> None:
        await self._subscribed.wait()

    async def _listen(self) -> None:
        failures = 0
        while True:
            try:
                pubsub = self._redis.pubsub()
                await pubsub.psubscribe(self._channel("*"), f"{self._prefix}decision:*")
                self._subscribed.set()
                failures = 0
                async for message in pubsub.listen():
                    if message.get("type") != "pmessage":
                        continue
                    channel = message["channel"]
                    channel = channel.decode() if isinstance(channel, bytes) else channel
                    event = self._events.get(channel)
                    if event is not None:
                        event.set()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - resubscribe after any Redis failure
                failures += 1
                if failures == 1:
                    log.warning("stop listener lost Redis (%s); resubscribing", error)
                await asyncio.sleep(min(5.0, 0.2 * failures))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
