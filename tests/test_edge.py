"""The real Envoy edge: JWT validation, native gRPC and grpc-web, CORS, rate limits."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from grpc import aio

from devtools.edge import envoy_process, free_edge_ports, render
from devtools.servers import RedisServer
from mesh.auth import AuthSettings
from mesh.context import Principal
from mesh.redisconn import RedisSettings
from mesh.server import ServiceRunner
from mesh.settings import ServerSettings
from mesh.tokens import KeyRing, issue_access_token
from opsmesh.session.v1 import session_pb2 as pb
from opsmesh.session.v1 import session_pb2_grpc
from ratelimit_svc.server import RateLimitSettings
from ratelimit_svc.server import build_runner as build_ratelimit
from session_svc.identity import IssuerSettings
from session_svc.server import build_runner as build_session
from tests.conftest import FAST_HEALTH, session_settings
from tests.helpers import assert_eventually

USER_LIMIT = 20
ADDRESS_LIMIT = 50
LOGIN_LIMIT = 5


@dataclass
class Edge:
    grpc_address: str
    http: httpx.AsyncClient
    ring: KeyRing
    issuer: str

    def token(self, user: str = "ada", org: str = "acme") -> str:
        return issue_access_token(
            self.ring, Principal(user, org), issuer=self.issuer, audience="opsmesh", ttl=300
        )


@pytest.fixture(params=["jwt"])
async def edge(request, redis_server: RedisServer, tmp_path: Path) -> AsyncIterator[Edge]:
    ports = free_edge_ports()
    issuer = f"http://127.0.0.1:{ports['session_http']}"
    base = session_settings(redis_server.url)
    session = build_session(
        type(base)(
            server=ServerSettings(port=ports["session"]),
            redis=base.redis,
            limits=base.limits,
            key_prefix=base.key_prefix,
            auth=AuthSettings(mode="jwt", issuer=issuer),
            issuer=IssuerSettings(keys_dir=tmp_path / "keys", http_port=ports["session_http"]),
        ),
        options=FAST_HEALTH,
    )
    rules = tmp_path / "ratelimits.toml"
    rules.write_text(
        '[[rule]]\nname = "per-user"\nkeys = ["user"]\n'
        f'requests_per_unit = {USER_LIMIT}\nunit = "hour"\n'
        f'[[rule]]\nname = "per-address"\nkeys = ["remote_address"]\n'
        f'requests_per_unit = {ADDRESS_LIMIT}\nunit = "hour"\n'
        '[[rule]]\nname = "login"\nkeys = ["path", "remote_address"]\n'
        'value = { path = "/oauth/authorize" }\n'
        f'requests_per_unit = {LOGIN_LIMIT}\nunit = "hour"\n'
    )
    ratelimit = build_ratelimit(
        RateLimitSettings(
            server=ServerSettings(port=ports["ratelimit"]),
            redis=RedisSettings(url=redis_server.url),
            rules=rules,
        ),
        options=FAST_HEALTH,
    )
    runners: list[ServiceRunner] = [session, ratelimit]
    for runner in runners:
        await runner.start()
    config = tmp_path / "envoy.yaml"
    # A rate limit domain of its own: counters never leak between tests.
    config.write_text(
        render(ports, domain=f"edge{tmp_path.name[-12:]}".replace("-", ""), issuer=issuer)
    )
    envoy = envoy_process(config, tmp_path / "envoy.log")
    envoy.start(timeout=30)

    async def live() -> None:
        # LIVE once listeners are warm (the JWKS fetched from the session service).
        async with httpx.AsyncClient() as admin:
            reply = await admin.get(f"http://127.0.0.1:{ports['admin']}/ready")
        assert reply.text.strip() == "LIVE"

    try:
        await assert_eventually(live, timeout=20)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports['edge']}") as http:
            yield Edge(f"127.0.0.1:{ports['edge']}", http, KeyRing(tmp_path / "keys"), issuer)
    finally:
        envoy.stop()
        for runner in runners:
            await runner.stop()


async def list_sessions(edge: Edge, metadata: tuple[tuple[str, str], ...]) -> grpc.StatusCode:
    async with aio.insecure_channel(edge.grpc_address) as channel:
        try:
            await session_pb2_grpc.SessionServiceStub(channel).ListSessions(
                pb.ListSessionsRequest(), metadata=metadata, timeout=10
            )
        except aio.AioRpcError as error:
            return error.code()
    return grpc.StatusCode.OK


async def test_native_grpc_through_envoy_needs_a_valid_token(edge) -> None:
    assert (
        await list_sessions(edge, (("authorization", f"Bearer {edge.token()}"),))
        == grpc.StatusCode.OK
    )
    assert await list_sessions(edge, ()) == grpc.StatusCode.UNAUTHENTICATED
    forged = edge.token()[:-4] + "AAAA"
    assert (
        await list_sessions(edge, (("authorization", f"Bearer {forged}"),))
        == grpc.StatusCode.UNAUTHENTICATED
    )
    # Identity headers sent straight to the edge prove nothing: Envoy wants the token.
    spoofed = (("x-opsmesh-user-id", "ada"), ("x-opsmesh-org-id", "acme"))
    assert await list_sessions(edge, spoofed) == grpc.StatusCode.UNAUTHENTICATED


def grpc_web_frame(message: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(message)) + message


async def test_grpc_web_and_cors_for_the_browser(edge) -> None:
    origin = {"Origin": "http://localhost:5173"}
    preflight = await edge.http.options(
        "/opsmesh.session.v1.SessionService/ListSessions",
        headers={
            **origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type,x-grpc-web",
        },
    )
    assert preflight.headers["access-control-allow-origin"] == "http://localhost:5173"
    response = await edge.http.post(
        "/opsmesh.session.v1.SessionService/ListSessions",
        content=grpc_web_frame(pb.ListSessionsRequest().SerializeToString()),
        headers={
            **origin,
            "content-type": "application/grpc-web+proto",
            "x-grpc-web": "1",
            "authorization": f"Bearer {edge.token('web')}",
        },
    )
    assert response.status_code == 200
    assert "grpc-status" in response.headers["access-control-expose-headers"]
    body = response.content
    frames = []
    while body:
        flag, length = body[0], struct.unpack(">I", body[1:5])[0]
        frames.append((flag, body[5 : 5 + length]))
        body = body[5 + length :]
    assert frames[0][0] == 0
    assert pb.ListSessionsResponse.FromString(frames[0][1]).sessions == []
    assert frames[-1][0] == 0x80
    assert b"grpc-status:0" in frames[-1][1]


async def test_oauth_and_discovery_are_open_at_the_edge(edge) -> None:
    discovery = await edge.http.get("/.well-known/openid-configuration")
    assert discovery.status_code == 200
    assert discovery.json()["issuer"] == edge.issuer
    assert (await edge.http.get("/.well-known/jwks.json")).json()["keys"]


async def test_per_user_limit_holds_under_a_burst(edge) -> None:
    token = edge.token(user="bursty")
    codes = [
        await list_sessions(edge, (("authorization", f"Bearer {token}"),))
        for _ in range(USER_LIMIT + 10)
    ]
    allowed = codes.count(grpc.StatusCode.OK)
    assert abs(allowed - USER_LIMIT) <= USER_LIMIT * 0.1, codes
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == len(codes) - allowed
    # Another user is not affected.
    assert (
        await list_sessions(edge, (("authorization", f"Bearer {edge.token(user='calm')}"),))
        == grpc.StatusCode.OK
    )


@pytest.mark.parametrize(("mode", "expected"), [("open", 1), ("closed", 2)])
async def test_rate_limits_without_redis_fail_open_or_closed_as_configured(
    own_redis, tmp_path, mode, expected, caplog
) -> None:
    from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
    from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

    rules = tmp_path / "rules.toml"
    rules.write_text(
        '[[rule]]\nname = "u"\nkeys = ["user"]\nrequests_per_unit = 1\nunit = "minute"\n'
    )
    runner = build_ratelimit(
        RateLimitSettings(
            server=ServerSettings(port=0),
            redis=RedisSettings(url=own_redis.url, socket_timeout=0.3, connect_timeout=0.3),
            rules=rules,
            failure_mode=mode,
        ),
    )
    await runner.start()
    request = rls_pb2.RateLimitRequest(
        domain="opsmesh",
        descriptors=[
            ratelimit_pb2.RateLimitDescriptor(
                entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key="user", value="x")]
            )
        ],
    )
    try:
        async with aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel:
            stub = rls_pb2_grpc.RateLimitServiceStub(channel)
            first = await stub.ShouldRateLimit(request)
            assert first.overall_code == 1
            assert first.statuses[0].current_limit.requests_per_unit == 1
            assert (await stub.ShouldRateLimit(request)).overall_code == 2
            unknown = rls_pb2.RateLimitRequest(
                domain="opsmesh",
                descriptors=[
                    ratelimit_pb2.RateLimitDescriptor(
                        entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key="other", value="y")]
                    )
                ],
            )
            assert (await stub.ShouldRateLimit(unknown)).overall_code == 1
            own_redis.stop()
            assert (await stub.ShouldRateLimit(request)).overall_code == expected
            assert any(f"failing {mode}" in r.getMessage() for r in caplog.records)
            own_redis.start()

            async def back() -> None:
                reply = await stub.ShouldRateLimit(request)
                assert reply.statuses

            await assert_eventually(back, timeout=10)
    finally:
        await runner.stop()


@pytest.mark.parametrize("edge", ["trusted-headers"], indirect=True)
async def test_behind_envoy_trusted_header_services_get_the_verified_identity(edge) -> None:
    """Envoy drops identity headers from outside and sets them from the verified token."""
    async with aio.insecure_channel(edge.grpc_address) as channel:
        stub = session_pb2_grpc.SessionServiceStub(channel)
        spoofing = (
            ("authorization", f"Bearer {edge.token('bob', 'acme')}"),
            ("x-opsmesh-user-id", "ada"),
            ("x-opsmesh-org-id", "globex"),
        )
        created = await stub.CreateSession(pb.CreateSessionRequest(), metadata=spoofing)
    assert (created.session.user_id, created.session.org_id) == ("bob", "acme")


async def test_per_address_limit_holds_across_users(edge) -> None:
    codes = [
        await list_sessions(edge, (("authorization", f"Bearer {edge.token(user=f'u{n}')}"),))
        for n in range(ADDRESS_LIMIT + 10)
    ]
    allowed = codes.count(grpc.StatusCode.OK)
    assert abs(allowed - ADDRESS_LIMIT) <= ADDRESS_LIMIT * 0.1, codes


async def test_per_endpoint_limit_on_the_login_page_answers_429_with_reset(edge) -> None:
    statuses = []
    for _ in range(LOGIN_LIMIT + 5):
        response = await edge.http.get("/oauth/authorize", params={"client_id": "x"})
        statuses.append(response.status_code)
    assert statuses.count(429) == 5, statuses
    limited = await edge.http.get("/oauth/authorize", params={"client_id": "x"})
    assert limited.status_code == 429
    assert int(limited.headers["x-ratelimit-reset"]) > 0
