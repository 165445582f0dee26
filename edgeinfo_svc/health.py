"""``grpc.health.v1`` at the edge: each public service's own health, asked of that service.

Envoy routes by path only, so every ``/grpc.health.v1.Health/`` call through the edge lands
here; the service name in the request says whose health is wanted:

- a public service's name: its own health endpoint is asked (``Check``, short deadline) and
  its answer passed on: SERVING, or NOT_SERVING while it starts, drains or lost a dependency.
  Nothing answering there (UNAVAILABLE: down, refusing new RPCs at the end of a drain) is
  NOT_SERVING too: the service cannot serve through the edge. No answer in time, or an answer
  that is not health (a wrong address), is UNKNOWN: the edge cannot tell, and says so.
- ``""``, the edge as a whole: SERVING only while this process serves and every public
  service is SERVING; a load balancer that needs finer grain asks per service.
- any other name: NOT_FOUND (``Watch``: SERVICE_UNKNOWN), as the health protocol asks.

``List`` answers for ``""`` and every public service.

``Watch`` re-checks every ``watch_interval`` and sends each change.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from typing import TypeAlias

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh.servicer import Context

log = logging.getLogger("opsmesh.edgeinfo")

Status: TypeAlias = int
"""A ``HealthCheckResponse.ServingStatus``."""
SERVING: Status = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING: Status = health_pb2.HealthCheckResponse.NOT_SERVING
UNKNOWN: Status = health_pb2.HealthCheckResponse.UNKNOWN
SERVICE_UNKNOWN: Status = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN

# A service that comes back is seen within a second (gRPC's default backoff grows to 2 min).
_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


class EdgeHealth:
    """The edge's health servicer; also the runner's status board for this process's own
    state (``set("")``, ``enter_graceful_shutdown``), which only the empty name reports."""

    def __init__(
        self, backends: Mapping[str, str], *, timeout: float = 1.0, watch_interval: float = 1.0
    ) -> None:
        self._backends = dict(backends)
        """Public service name → the address of its own gRPC server."""
        self._timeout = timeout
        self._watch_interval = watch_interval
        self._own: Status = NOT_SERVING
        self._channels: dict[str, aio.Channel] = {}

    async def set(self, service: str, status: Status) -> None:
        if service == "":
            self._own = status

    async def enter_graceful_shutdown(self) -> None:
        self._own = NOT_SERVING

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close(None)

    def _stub(self, address: str) -> health_pb2_grpc.HealthStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
            self._channels[address] = channel
        return health_pb2_grpc.HealthStub(channel)

    async def _backend_status(self, service: str, deadline: float) -> Status:
        address = self._backends[service]
        try:
            reply = await self._stub(address).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=deadline
            )
        except aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNAVAILABLE:
                log.debug("%s at %s unreachable: %s", service, address, error.details())
                return NOT_SERVING
            log.warning(
                "%s at %s: health check failed: %s %s",
                service,
                address,
                error.code().name,
                error.details(),
            )
            return UNKNOWN
        return int(reply.status)

    async def status_of(self, service: str, deadline: float | None = None) -> Status | None:
        """The status reported for ``service``; None for a name the edge does not serve."""
        wait = self._timeout if deadline is None else min(self._timeout, deadline)
        if service == "":
            if self._own != SERVING:
                return NOT_SERVING
            statuses = await asyncio.gather(
                *(self._backend_status(name, wait) for name in self._backends)
            )
            return SERVING if all(s == SERVING for s in statuses) else NOT_SERVING
        if service not in self._backends:
            return None
        return await self._backend_status(service, wait)

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: Context
    ) -> health_pb2.HealthCheckResponse:
        # Leave the caller time to hear the answer: at most 80% of its own deadline.
        remaining = context.time_remaining()
        status = await self.status_of(
            request.service, None if remaining is None else max(remaining * 0.8, 0.01)
        )
        if status is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"unknown service {request.service!r}; the edge knows "
                + ", ".join(sorted(self._backends)),
            )
        return health_pb2.HealthCheckResponse(status=status)

    async def List(
        self, request: health_pb2.HealthListRequest, context: Context
    ) -> health_pb2.HealthListResponse:
        names = ("", *self._backends)
        statuses = await asyncio.gather(*(self.status_of(name) for name in names))
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status)
                for name, status in zip(names, statuses, strict=True)
            }
        )

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: Context
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last: Status | None = None
        while True:
            status = await self.status_of(request.service)
            current = SERVICE_UNKNOWN if status is None else status
            if current != last:
                yield health_pb2.HealthCheckResponse(status=current)
                last = current
            await asyncio.sleep(self._watch_interval)
