"""Test helpers: polling with deadlines instead of sleeps, principals, status details."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from mesh.auth import ORG_HEADER, ROLES_HEADER, USER_HEADER

T = TypeVar("T")


async def assert_eventually(
    check: Callable[[], Awaitable[T]],
    *,
    timeout: float = 10.0,  # noqa: ASYNC109 - a polling deadline, not a call timeout
    interval: float = 0.05,
) -> T:
    """Calls ``check`` until it returns without raising AssertionError, or fails at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(interval)


def identity(
    user: str = "alice", org: str = "acme", roles: str = ""
) -> tuple[tuple[str, str], ...]:
    metadata = [(USER_HEADER, user), (ORG_HEADER, org)]
    if roles:
        metadata.append((ROLES_HEADER, roles))
    return tuple(metadata)


def error_details(error: grpc.aio.AioRpcError) -> dict[str, object]:
    """The google.rpc details of a failed call, by type name."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    found: dict[str, object] = {}
    if status is None:
        return found
    for detail in status.details:
        for kind in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.BadRequest,
            error_details_pb2.RetryInfo,
        ):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                found[kind.DESCRIPTOR.name] = message
    return found
