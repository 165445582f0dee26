"""Work that must finish even when the RPC that started it is cancelled.

A caller that goes away (a worker killed mid-call, a deadline) cancels its RPC's
handler. An email accepted by the mail server must still be recorded as sent,
or the next delivery would send it again: such work runs as a task of its own
that the handler awaits through :func:`asyncio.shield`, and shutdown waits for it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

log = logging.getLogger("opsmesh.notify")

T = TypeVar("T")


class ShieldedTasks:
    def __init__(self) -> None:
        self._running: set[asyncio.Task[Any]] = set()

    async def run(self, work: Coroutine[Any, Any, T]) -> T:
        """Runs ``work`` to its end; cancelling the caller leaves it running."""
        task = asyncio.create_task(work)
        self._running.add(task)
        task.add_done_callback(self._finished)
        return await asyncio.shield(task)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._running.discard(task)
        # Reading the outcome here keeps asyncio quiet about tasks whose caller left.
        if not task.cancelled() and task.exception() is not None:
            log.debug("shielded work ended with %r", task.exception())

    @property
    def running(self) -> int:
        return len(self._running)

    async def drain(self, timeout: float) -> None:  # noqa: ASYNC109 - a shutdown budget
        """Waits up to ``timeout`` for running work, then cancels what is left."""
        if not self._running:
            return
        log.info("waiting up to %.1fs for %d shielded task(s)", timeout, len(self._running))
        _, late = await asyncio.wait(set(self._running), timeout=timeout)
        for task in late:
            log.warning("shielded work still running at shutdown: cancelled")
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
