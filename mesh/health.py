"""Real health: a service is SERVING only while its dependencies answer.

A :class:`HealthMonitor` runs the service's probes on an interval and sets the
``grpc.health.v1`` status of the service (and of the server as a whole, the
empty service name) accordingly, logging each transition once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from grpc_health.v1 import health_pb2

log = logging.getLogger("opsmesh.health")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class StatusBoard(Protocol):
    """What the monitor needs of ``grpc_health.v1.health.aio.HealthServicer``."""

    async def set(self, service: str, status: int) -> None: ...

    async def enter_graceful_shutdown(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Probe:
    """A named check of one dependency; ``check`` raises when it is down."""

    name: str
    check: Callable[[], Awaitable[object]]


class HealthMonitor:
    def __init__(
        self,
        servicer: StatusBoard,
        *,
        service_names: Sequence[str],
        probes: Sequence[Probe],
        interval: float = 2.0,
        timeout: float = 1.0,
    ) -> None:
        self._servicer = servicer
        self._names = ("", *service_names)
        self._probes = tuple(probes)
        self._interval = interval
        self._timeout = timeout
        self._healthy: bool | None = None
        self._stopped = False

    async def _probe_all(self) -> list[str]:
        failures: list[str] = []
        for probe in self._probes:
            try:
                await asyncio.wait_for(probe.check(), self._timeout)
            except Exception as error:  # noqa: BLE001 - any failure means "down"
                failures.append(f"{probe.name}: {type(error).__name__}: {error}")
        return failures

    async def check_once(self) -> bool:
        failures = await self._probe_all()
        healthy = not failures
        if self._stopped:
            return healthy
        if healthy != self._healthy:
            if healthy:
                log.info("dependencies healthy: SERVING")
            else:
                log.warning("dependencies down: NOT_SERVING (%s)", "; ".join(failures))
            self._healthy = healthy
            status = SERVING if healthy else NOT_SERVING
            for name in self._names:
                await self._servicer.set(name, status)
        return healthy

    async def run(self) -> None:
        while not self._stopped:
            await self.check_once()
            await asyncio.sleep(self._interval)

    async def shut_down(self) -> None:
        """Reports NOT_SERVING for good: the server is draining."""
        self._stopped = True
        await self._servicer.enter_graceful_shutdown()
