"""Test helpers: polling with deadlines instead of sleeps, principals, status details."""

from __future__ import annotations

import asyncio
import time
import tomllib
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import grpc
import httpx
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from mesh.auth import ORG_HEADER, ROLES_HEADER, USER_HEADER
from opsmesh.session.v1 import session_pb2

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
PRODUCT_PACKAGES: tuple[str, ...] = tuple(
    tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["coverage"]["run"]["source"]
)
"""Our own Python packages, as the coverage gate measures them (pyproject.toml)."""


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


async def wait_envoy_live(admin_port: int, *, timeout: float = 20.0) -> None:  # noqa: ASYNC109
    """Until Envoy's admin ``/ready`` says LIVE: its listeners are warm (the JWKS fetched)."""

    async def live() -> None:
        async with httpx.AsyncClient() as admin:
            reply = await admin.get(f"http://127.0.0.1:{admin_port}/ready")
        assert reply.text.strip() == "LIVE"

    await assert_eventually(live, timeout=timeout)


async def redeem_code(
    http: httpx.AsyncClient,
    *,
    code: str,
    verifier: str,
    client_id: str,
    redirect_uri: str,
    overrides: Mapping[str, str] | None = None,
) -> httpx.Response:
    """The token endpoint's answer to an authorization code (fields replaced by ``overrides``)."""
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "client_id": client_id,
        "redirect_uri": redirect_uri,
        "code_verifier": verifier,
    }
    return await http.post("/oauth/token", data={**form, **(overrides or {})})


async def refresh_grant(http: httpx.AsyncClient, token: str, client_id: str) -> httpx.Response:
    """The token endpoint's answer to a refresh token."""
    return await http.post(
        "/oauth/token",
        data={"grant_type": "refresh_token", "refresh_token": token, "client_id": client_id},
    )


async def status_with_token(sessions: Any, access_token: str) -> grpc.StatusCode:
    """What the session service answers ListSessions with this access token (OK or the code)."""
    try:
        await sessions.ListSessions(
            session_pb2.ListSessionsRequest(),
            metadata=(("authorization", f"Bearer {access_token}"),),
        )
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK
