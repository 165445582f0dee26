"""Several Redis commands in one round trip on one pooled connection: :class:`RedisBatch`.

Not a transaction: each command runs on its own and answers on its own, as in a redis-py
pipeline without MULTI. redis-py's pipeline asks Redis ``SCRIPT EXISTS`` for its scripts on
every execute (one more round trip) and goes through its generic command path; a hot path
that writes two independent keys per request wants neither.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.connection import AbstractConnection

from mesh.redisconn import LuaScript, exchange

Encodable = str | bytes | int | float


class RedisBatch:
    """Commands and Lua scripts queued with :meth:`command` and :meth:`script`, sent in one
    write by :meth:`run` and answered in order.

    A script Redis has lost (restart, ``SCRIPT FLUSH``) answers ``NOSCRIPT``, which means it
    did not run: it is loaded and that command alone sent again. Any other error reply is
    raised after every reply was read (so the connection goes back to the pool clean); a
    connection that fails or is cancelled mid-exchange is dropped (see
    :func:`mesh.redisconn.exchange`), never reused.
    """

    def __init__(self, client: aioredis.Redis) -> None:
        self._pool = client.connection_pool
        self._commands: list[tuple[Any, ...]] = []
        self._scripts: dict[int, LuaScript] = {}

    def __len__(self) -> int:
        return len(self._commands)

    def command(self, *args: Encodable) -> None:
        self._commands.append(args)

    def script(
        self, script: LuaScript, keys: Sequence[str], args: Sequence[Encodable] = ()
    ) -> None:
        self._scripts[len(self._commands)] = script
        self._commands.append(script.command(keys, args))

    async def run(self) -> list[Any]:
        """Every command's reply, in the order they were queued."""
        if not self._commands:
            return []
        connection: AbstractConnection = await self._pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            replies = await exchange(connection, self._commands)
            lost = [
                index
                for index, reply in enumerate(replies)
                if isinstance(reply, redis.exceptions.NoScriptError) and index in self._scripts
            ]
            if lost:
                scripts = {id(self._scripts[i]): self._scripts[i] for i in lost}.values()
                await exchange(connection, [("SCRIPT", "LOAD", s.source) for s in scripts])
                again = await exchange(connection, [self._commands[i] for i in lost])
                for index, reply in zip(lost, again, strict=True):
                    replies[index] = reply
        finally:
            await self._pool.release(connection)
        for reply in replies:
            if isinstance(reply, redis.exceptions.ResponseError):
                raise reply
        return replies
