"""NATS connections for services, and the mapping of NATS outages to UNAVAILABLE."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client

from mesh.errors import DependencyUnavailable
from mesh.settings import seconds, setting

log = logging.getLogger("opsmesh.nats")

# Errors that mean "NATS cannot serve this now" (down, reconnecting, JetStream unavailable).
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.ConnectionDrainingError,
    nats.errors.NoServersError,
    nats.errors.NoRespondersError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.TimeoutError,
    nats.errors.StaleConnectionError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.NoStreamResponseError,
    asyncio.TimeoutError,
    OSError,
)


DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
"""NATS' own default address: the dev stack (``make up``) sets its own explicitly."""


def _nats_urls(raw: str) -> str:
    if not all(part.strip().startswith(("nats://", "tls://")) for part in raw.split(",")):
        raise ValueError("expected nats:// or tls:// URLs, comma-separated")
    return raw


@dataclass(frozen=True, kw_only=True)
class NatsSettings:
    url: str = setting("OPSMESH_NATS_URL", DEFAULT_NATS_URL, _nats_urls)
    connect_timeout: float = seconds("OPSMESH_NATS_CONNECT_TIMEOUT", 2.0, minimum=0.1, maximum=60)
    request_timeout: float = seconds("OPSMESH_NATS_TIMEOUT", 2.0, minimum=0.1, maximum=60)
    """Timeout of JetStream API calls and publish acknowledgements."""


async def connect_nats(settings: NatsSettings, *, name: str) -> Client:
    """A connection that reconnects forever (a service must outlive a NATS restart)."""

    async def disconnected() -> None:
        log.warning("disconnected from NATS; reconnecting")

    async def reconnected() -> None:
        log.info("reconnected to NATS")

    async def error(exc: Exception) -> None:
        log.warning("NATS connection error: %s: %s", type(exc).__name__, exc)

    with nats_errors():
        client: Client = await nats.connect(
            servers=[part.strip() for part in settings.url.split(",")],
            name=name,
            connect_timeout=settings.connect_timeout,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            allow_reconnect=True,
            disconnected_cb=disconnected,
            reconnected_cb=reconnected,
            error_cb=error,
            # No buffering while disconnected: a write is refused at once (UNAVAILABLE) instead
            # of being replayed later, when its caller has long been told it failed.
            pending_size=0,
        )
    return client


async def close_nats(client: Client) -> None:
    """Drains a connected client (in-flight messages finish); closes one that is not."""
    if client.is_connected:
        await client.drain()
    else:
        await client.close()


# The JetStream API's subject prefix; opsmesh runs JetStream without a domain.
JETSTREAM_API = "$JS.API"


async def jetstream_request(
    nc: Client, operation: str, request: Mapping[str, Any], *, request_timeout: float
) -> dict[str, Any]:
    """One JetStream API call (``operation``: e.g. ``STREAM.PURGE.<stream>``), its answer.

    For what nats.py's JetStream context leaves out of its answers or requests (a purge's
    count, subject listings by offset). An error answer raises nats.py's own APIError
    subclass, and an outage is DependencyUnavailable, as with ``nats_errors``.
    """
    with nats_errors():
        reply = await nc.request(
            f"{JETSTREAM_API}.{operation}", json.dumps(request).encode(), timeout=request_timeout
        )
        answer: dict[str, Any] = json.loads(reply.data)
        if "error" in answer:
            nats.js.errors.APIError.from_error(answer["error"])
    return answer


@contextmanager
def nats_errors() -> Iterator[None]:
    """Turns NATS outages inside the block into DependencyUnavailable."""
    try:
        yield
    except UNAVAILABLE_ERRORS as failure:
        raise DependencyUnavailable("nats", failure) from failure
