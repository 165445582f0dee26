"""The real Envoy edge: JWT validation, native gRPC and grpc-web, CORS, rate limits."""

from __future__ import annotations

import asyncio
import json
import shutil
import struct
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
import httpx
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from chat_svc.config import ChatSettings
from chat_svc.model import ModelSettings
from chat_svc.server import build_runner as build_chat
from devtools.edge import EdgeTopology, envoy_process, free_edge_ports, render
from devtools.servers import RedisServer
from edgeinfo_svc.health import EdgeHealth
from edgeinfo_svc.server import (
    CHAT,
    NOTIFY,
    PUBLIC_SERVICES,
    SESSION,
    TASK,
    EdgeInfoSettings,
)
from edgeinfo_svc.server import build_runner as build_edgeinfo
from identity_svc.keys import KeyRing, issue_access_token
from identity_svc.server import build_runner as build_identity
from mesh.auth import AuthSettings
from mesh.context import Principal
from mesh.redisconn import RedisSettings
from mesh.server import ServiceRunner
from mesh.settings import ServerSettings
from opsmesh.identity.v1 import identity_pb2, identity_pb2_grpc
from opsmesh.session.v1 import session_pb2 as pb
from opsmesh.session.v1 import session_pb2_grpc
from ratelimit_svc.server import RateLimitSettings
from ratelimit_svc.server import build_runner as build_ratelimit
from session_svc.server import build_runner as build_session
from tests.conftest import FAST_HEALTH, identity_settings, session_settings
from tests.helpers import assert_eventually, wait_envoy_live

USER_LIMIT = 20
ADDRESS_LIMIT = 50
LOGIN_LIMIT = 5


@dataclass
class Edge:
    grpc_address: str
    http: httpx.AsyncClient
    ring: KeyRing
    issuer: str
    ports: dict[str, int] = field(default_factory=dict)

    def token(self, user: str = "ada", org: str = "acme") -> str:
        return issue_access_token(
            self.ring, Principal(user, org), issuer=self.issuer, audience="opsmesh", ttl=300
        )


@pytest.fixture(params=["jwt"])
async def edge(request, redis_server: RedisServer, tmp_path: Path) -> AsyncIterator[Edge]:
    ports = free_edge_ports()
    issuer = f"http://127.0.0.1:{ports['identity_http']}"
    base = session_settings(redis_server.url)
    session = build_session(
        type(base)(
            server=ServerSettings(port=ports["session"]),
            redis=base.redis,
            limits=base.limits,
            key_prefix=base.key_prefix,
            auth=AuthSettings(mode="jwt", issuer=issuer),
        ),
        options=FAST_HEALTH,
    )
    identity = build_identity(
        replace(
            identity_settings(
                redis_server.url, keys_dir=tmp_path / "keys", http_port=ports["identity_http"]
            ),
            server=ServerSettings(port=ports["identity"]),
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
    # Reflection and health at the edge; only identity and session run behind it here (the
    # others' ports are free: down until a test starts one there).
    edgeinfo = build_edgeinfo(
        EdgeInfoSettings(
            server=ServerSettings(port=ports["edgeinfo"]),
            identity_address=f"127.0.0.1:{ports['identity']}",
            session_address=f"127.0.0.1:{ports['session']}",
            chat_address=f"127.0.0.1:{ports['chat']}",
            task_address=f"127.0.0.1:{ports['task']}",
            notify_address=f"127.0.0.1:{ports['notify']}",
            health_timeout=0.5,
            watch_interval=0.1,
        ),
        options=FAST_HEALTH,
    )
    runners: list[ServiceRunner] = [identity, session, ratelimit, edgeinfo]
    for runner in runners:
        await runner.start()
    config = tmp_path / "envoy.yaml"
    # A rate limit domain of its own: counters never leak between tests.
    config.write_text(
        render(
            EdgeTopology.dev(
                ports,
                ratelimit_domain=f"edge{tmp_path.name[-12:]}".replace("-", ""),
                issuer=issuer,
            )
        )
    )
    envoy = envoy_process(config, tmp_path / "envoy.log")
    envoy.start(timeout=30)

    try:
        await wait_envoy_live(ports["admin"])
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports['edge']}") as http:
            yield Edge(
                f"127.0.0.1:{ports['edge']}", http, KeyRing(tmp_path / "keys"), issuer, ports
            )
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


async def test_the_identity_service_answers_who_calls_through_the_edge(edge) -> None:
    async with aio.insecure_channel(edge.grpc_address) as channel:
        stub = identity_pb2_grpc.IdentityServiceStub(channel)
        answer = await stub.GetCurrentUser(
            identity_pb2.GetCurrentUserRequest(),
            metadata=(("authorization", f"Bearer {edge.token('grace', 'globex')}"),),
            timeout=10,
        )
        with pytest.raises(aio.AioRpcError) as refused:
            await stub.GetCurrentUser(identity_pb2.GetCurrentUserRequest(), timeout=10)
    assert (answer.user.user_id, answer.user.org_id) == ("grace", "globex")
    assert answer.user.account_kind == identity_pb2.ACCOUNT_KIND_NONE  # an operator's token
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


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
            fresh = rls_pb2.RateLimitRequest()
            fresh.CopyFrom(request)
            fresh.descriptors[0].entries[0].value = "z"
            assert (await stub.ShouldRateLimit(fresh)).overall_code == expected
            # A user already over the limit stays refused from memory until its window ends.
            assert (await stub.ShouldRateLimit(request)).overall_code == 2
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


GRPCURL = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
HAVE_GRPCURL = Path(GRPCURL).exists()
needs_grpcurl = pytest.mark.skipif(
    not HAVE_GRPCURL, reason="grpcurl is not installed (make install)"
)
REFLECTION_SERVICES = {
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
}


async def grpcurl(
    edge: Edge, *args: str, data: str | None = None, token: str | None = None
) -> tuple[int, str, str]:
    """Real grpcurl through the edge, with no .proto files: everything comes from reflection.
    (A subprocess of the event loop: the services of the test answer from this loop.)"""
    auth = ["-H", f"authorization: Bearer {token}"] if token else []
    body = ["-d", data] if data is not None else []
    process = await asyncio.create_subprocess_exec(
        GRPCURL,
        "-plaintext",
        *auth,
        *body,
        edge.grpc_address,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@needs_grpcurl
async def test_grpcurl_through_the_edge_lists_describes_and_calls_every_public_service(
    edge,
) -> None:
    token = edge.token()
    code, out, err = await grpcurl(edge, "list", token=token)
    assert code == 0, err
    assert set(out.split()) == {*PUBLIC_SERVICES, "grpc.health.v1.Health", *REFLECTION_SERVICES}
    assert "envoy.service.ratelimit.v3.RateLimitService" not in out

    code, out, err = await grpcurl(edge, "describe", "opsmesh.chat.v1.ChatService", token=token)
    assert code == 0, err
    assert "rpc StreamChat ( .opsmesh.chat.v1.StreamChatRequest )" in out
    assert "returns ( stream .opsmesh.chat.v1.StreamChatResponse )" in out
    # Worker-only RPCs are part of their service's contract.
    code, out, err = await grpcurl(
        edge, "describe", "opsmesh.notify.v1.NotificationService", token=token
    )
    assert "rpc DeliverNotification" in out, err
    code, out, err = await grpcurl(
        edge, "describe", "opsmesh.task.v1.WatchTaskRequest", token=token
    )
    assert code == 0, err
    assert "string task_id = 1;" in out

    # A call whose request JSON is built from reflection alone (no -proto flags).
    code, out, err = await grpcurl(
        edge, "opsmesh.session.v1.SessionService/ListSessions", data="{}", token=token
    )
    assert code == 0, err
    assert json.loads(out) == {}
    code, out, err = await grpcurl(
        edge,
        "opsmesh.session.v1.SessionService/CreateSession",
        data='{"title": "via the edge"}',
        token=token,
    )
    assert code == 0, err
    assert json.loads(out)["session"]["title"] == "via the edge"


@needs_grpcurl
async def test_reflection_through_the_edge_needs_a_token(edge) -> None:
    code, _, err = await grpcurl(edge, "list")
    assert code != 0
    assert "Unauthenticated" in err, err
    forged = edge.token()[:-4] + "AAAA"
    code, _, err = await grpcurl(edge, "describe", "opsmesh.chat.v1.ChatService", token=forged)
    assert code != 0
    assert "Unauthenticated" in err, err


async def reflect(
    edge: Edge, version: str, request: reflection_pb2.ServerReflectionRequest, token: str
) -> reflection_pb2.ServerReflectionResponse:
    """One reflection request through the edge on ``grpc.reflection.<version>`` (v1 and
    v1alpha share their messages on the wire)."""
    metadata = (("authorization", f"Bearer {token}"),)
    async with aio.insecure_channel(edge.grpc_address) as channel:
        call = channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )(iter([request]), metadata=metadata, timeout=10)
        replies = [reply async for reply in call]
    return replies[0]


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
async def test_reflection_v1_and_v1alpha_answer_through_the_edge(edge, version) -> None:
    listed = await reflect(
        edge, version, reflection_pb2.ServerReflectionRequest(list_services=""), edge.token()
    )
    names = {s.name for s in listed.list_services_response.service}
    assert names == {*PUBLIC_SERVICES, "grpc.health.v1.Health", *REFLECTION_SERVICES}
    found = await reflect(
        edge,
        version,
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol=f"grpc.reflection.{version}.ServerReflection"
        ),
        edge.token(),
    )
    files = found.file_descriptor_response.file_descriptor_proto
    assert files, found
    # Without a token Envoy refuses the stream before it reaches edgeinfo_svc.
    async with aio.insecure_channel(edge.grpc_address) as channel:
        call = channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )(timeout=10)
        assert await call.code() == grpc.StatusCode.UNAUTHENTICATED


async def health(edge: Edge, service: str) -> int:
    """Health/Check through the edge, without a token (load balancers have none)."""
    async with aio.insecure_channel(edge.grpc_address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
    return int(reply.status)


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def test_health_through_the_edge_answers_for_each_service(
    edge, redis_server: RedisServer, history_dsn: str
) -> None:
    assert await health(edge, SESSION) == SERVING
    # Nothing runs at chat's, task's and notify's addresses yet.
    for name in (CHAT, TASK, NOTIFY):
        assert await health(edge, name) == NOT_SERVING
    # The edge as a whole: SERVING only while every public service is.
    assert await health(edge, "") == NOT_SERVING
    with pytest.raises(aio.AioRpcError) as unknown:
        await health(edge, "opsmesh.nope.v1.NopeService")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(aio.AioRpcError) as internal:
        await health(edge, "envoy.service.ratelimit.v3.RateLimitService")
    assert internal.value.code() == grpc.StatusCode.NOT_FOUND

    chat = await build_chat(
        ChatSettings(
            server=ServerSettings(port=edge.ports["chat"], drain_delay=1.5, grace_period=0.5),
            model=ModelSettings(host="http://127.0.0.1:9"),
            redis=RedisSettings(url=redis_server.url),
            history_dsn=history_dsn,
            session_address=f"127.0.0.1:{edge.ports['session']}",
        ),
        options=FAST_HEALTH,
    )
    await chat.start()
    stopping: asyncio.Task[None] | None = None
    try:

        async def chat_serving() -> None:
            assert await health(edge, CHAT) == SERVING

        await assert_eventually(chat_serving, timeout=10)
        if HAVE_GRPCURL:
            # The issue's command; grpcurl needs the token for reflection (Health itself is
            # public: load balancers call it natively, as health() does).
            code, out, err = await grpcurl(
                edge,
                "grpc.health.v1.Health/Check",
                data=json.dumps({"service": CHAT}),
                token=edge.token(),
            )
            assert code == 0, err
            assert json.loads(out) == {"status": "SERVING"}

        # Draining: chat still answers, NOT_SERVING, before it refuses new RPCs; then gone.
        stopping = asyncio.create_task(chat.stop())
        await asyncio.sleep(0.2)
        assert await health(edge, CHAT) == NOT_SERVING
        await stopping
        assert await health(edge, CHAT) == NOT_SERVING
        assert await health(edge, SESSION) == SERVING
    finally:
        if stopping is None:
            await chat.stop()


async def test_edge_health_watch_sends_each_change(edge) -> None:
    async with aio.insecure_channel(edge.grpc_address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=SESSION), timeout=10)
        first = await watch.read()
        assert first.status == SERVING
        watch.cancel()
        unknown = stub.Watch(health_pb2.HealthCheckRequest(service="no.Such"), timeout=10)
        assert (await unknown.read()).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        unknown.cancel()


async def test_edge_health_maps_each_answer_precisely(edge) -> None:
    """The aggregation on its own: all serving → SERVING; a backend that answers something
    other than health for the name (a wrong address) → UNKNOWN; draining → NOT_SERVING."""
    session = f"127.0.0.1:{edge.ports['session']}"
    board = EdgeHealth({SESSION: session}, timeout=0.5)
    try:
        assert await board.status_of("") == NOT_SERVING  # not started yet
        await board.set("", SERVING)
        assert await board.status_of("") == SERVING
        assert await board.status_of(CHAT) is None
        await board.enter_graceful_shutdown()
        assert await board.status_of("") == NOT_SERVING
        assert await board.status_of(SESSION) == SERVING
    finally:
        await board.close()
    # Chat's name pointed at the session server: it answers NOT_FOUND for a name it does
    # not serve; the edge cannot tell chat's health.
    wrong = EdgeHealth({CHAT: session}, timeout=0.5)
    try:
        assert await wrong.status_of(CHAT) == health_pb2.HealthCheckResponse.UNKNOWN
    finally:
        await wrong.close()
