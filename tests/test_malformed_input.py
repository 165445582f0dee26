"""Malformed requests answer INVALID_ARGUMENT (MALFORMED_REQUEST) on every service, never a crash.

Each service gets hand-made bytes no client library would send: a string field that is not
UTF-8, a message cut short, messages nested past protobuf's depth limit (a Struct 60 deep).
The answer names no exception class and the servers log no ERROR.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from google.protobuf import json_format, struct_pb2
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chat_svc.server import build_runner as build_chat
from devtools.servers import NatsServer, RedisServer
from edgeinfo_svc.server import EdgeInfoSettings
from edgeinfo_svc.server import build_runner as build_edgeinfo
from mesh.auth import authenticator_from_mode
from mesh.errors import InvalidArgument
from mesh.redisconn import RedisSettings
from mesh.rpc import JSON_HEADROOM, check_json_depth
from mesh.server import Registration, ServiceRunner
from mesh.settings import ServerSettings
from opsmesh.session.v1 import session_pb2, session_pb2_grpc
from ratelimit_svc.server import RateLimitSettings
from ratelimit_svc.server import build_runner as build_ratelimit
from tests.conftest import FAST_HEALTH
from tests.helpers import assert_eventually, error_details, identity
from tests.ollama_standin import OllamaStandIn
from tests.taskkit import task_stack
from tests.test_chat import chat_settings
from tests.test_edge import Edge, edge, grpc_web_frame  # noqa: F401 - the real edge, a fixture
from tests.test_notify import notify_stack

# Protobuf's own depth limit is 100 messages; a Struct level is three (Struct, its map entry,
# Value), so 60 levels are far past it.
DEEP = 60
# Words that would give away how the server is built.
INTERNALS = ("Error", "Exception", "class", "Traceback", "upb", "Decode")

Payload = Callable[["Target"], bytes]


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def length_delimited(number: int, payload: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def nested_struct(depth: int) -> bytes:
    """A google.protobuf.Struct ``{"a": {"a": ...}}`` ``depth`` levels deep, encoded by hand."""
    struct = b""
    for _ in range(depth - 1):
        value = length_delimited(5, struct)  # Value.struct_value
        entry = length_delimited(1, b"a") + length_delimited(2, value)
        struct = length_delimited(1, entry)  # Struct.fields
    return struct


def nested_groups(depth: int, number: int = 999) -> bytes:
    """An unknown field of ``depth`` nested groups (for requests without a Struct)."""
    return varint(number << 3 | 3) * depth + varint(number << 3 | 4) * depth


@dataclass(frozen=True)
class Target:
    method: str
    kind: str  # "unary", "server_stream" or "bidi"
    string_field: int
    struct_field: int | None = None


def bad_utf8(target: Target) -> bytes:
    return length_delimited(target.string_field, b"ok\xff\xfe")


def truncated(target: Target) -> bytes:
    return length_delimited(target.string_field, b"abcdef")[:-3]


def too_deep(target: Target) -> bytes:
    if target.struct_field is None:
        return nested_groups(3 * DEEP)
    return length_delimited(target.struct_field, nested_struct(DEEP))


MALFORMED: tuple[Payload, ...] = (bad_utf8, truncated, too_deep)


async def call_raw(
    channel: aio.Channel, target: Target, payload: bytes, seconds: float = 10
) -> aio.AioRpcError:
    """Sends ``payload`` as the request bytes (no serializer) and returns the failure."""
    metadata = identity()
    try:
        if target.kind == "unary":
            await channel.unary_unary(target.method)(payload, metadata=metadata, timeout=seconds)
        elif target.kind == "server_stream":
            async for _ in channel.unary_stream(target.method)(
                payload, metadata=metadata, timeout=seconds
            ):
                pass
        else:
            call = channel.stream_stream(target.method)(metadata=metadata, timeout=seconds)
            await call.write(payload)
            await call.done_writing()
            async for _ in call:
                pass
    except aio.AioRpcError as error:
        return error
    raise AssertionError(f"{target.method} accepted {payload!r}")


def assert_malformed_answer(error: aio.AioRpcError) -> None:
    details = error.details() or ""
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), details)
    assert not [word for word in INTERNALS if word in details], details
    info = error_details(error)["ErrorInfo"]
    assert info.reason == "MALFORMED_REQUEST"  # type: ignore[attr-defined]


async def assert_every_malformed_request_refused(
    address: str, target: Target, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with aio.insecure_channel(address) as channel:
        for payload in MALFORMED:
            error = await call_raw(channel, target, payload(target))
            assert_malformed_answer(error)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors
    warnings = [
        r
        for r in caplog.records
        if r.levelno == logging.WARNING and target.method in r.getMessage()
    ]
    assert len(warnings) == len(MALFORMED)
    assert all(r.exc_info is None for r in warnings)


@asynccontextmanager
async def started(runner: ServiceRunner) -> AsyncIterator[str]:
    await runner.start()
    try:
        yield f"127.0.0.1:{runner.port}"
    finally:
        await runner.stop()


SESSION = Target("/opsmesh.session.v1.SessionService/UpdateContext", "unary", 1, 2)
CHAT = Target("/opsmesh.chat.v1.ChatService/StreamChat", "server_stream", 1)
NOTIFY = Target("/opsmesh.notify.v1.NotificationService/PreviewEmail", "unary", 1, 3)
TASK = Target("/opsmesh.task.v1.TaskService/GetTask", "unary", 1)
RATELIMIT = Target("/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit", "unary", 1)
# Reflection is on every server: the request stream of a bidi method.
REFLECTION = Target("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "bidi", 1)


async def test_session_service_refuses_malformed_requests(
    session_runner: ServiceRunner, caplog: pytest.LogCaptureFixture
) -> None:
    await assert_every_malformed_request_refused(
        f"127.0.0.1:{session_runner.port}", SESSION, caplog
    )


async def test_chat_service_refuses_malformed_requests(
    session_runner: ServiceRunner,
    redis_server: RedisServer,
    history_dsn: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ollama = await OllamaStandIn().start()
    try:
        settings = chat_settings(session_runner, redis_server.url, history_dsn, ollama.url)
        async with started(await build_chat(settings, options=FAST_HEALTH)) as address:
            await assert_every_malformed_request_refused(address, CHAT, caplog)
    finally:
        await ollama.stop()


async def test_notify_service_refuses_malformed_requests(
    redis_server: RedisServer, nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with notify_stack(redis_server.url, nats_server.url, with_worker=False) as stack:
        address = f"127.0.0.1:{stack.runner.port}"
        await assert_every_malformed_request_refused(address, NOTIFY, caplog)


async def test_task_service_refuses_malformed_requests(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with task_stack(nats_server.url) as stack:
        await assert_every_malformed_request_refused(f"127.0.0.1:{stack.runner.port}", TASK, caplog)


async def test_ratelimit_service_refuses_malformed_requests(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    settings = RateLimitSettings(
        server=ServerSettings(port=0), redis=RedisSettings(url=redis_server.url)
    )
    async with started(build_ratelimit(settings, options=FAST_HEALTH)) as address:
        await assert_every_malformed_request_refused(address, RATELIMIT, caplog)


async def test_edgeinfo_service_refuses_malformed_requests(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = EdgeInfoSettings(server=ServerSettings(port=0))
    async with started(build_edgeinfo(settings, options=FAST_HEALTH)) as address:
        await assert_every_malformed_request_refused(address, REFLECTION, caplog)


def nested_json(depth: int, *, in_lists: bool = False) -> object:
    """``{"a": {"a": ...}}`` (or ``[[...]]``) with ``depth`` objects (arrays) in all."""
    value: object = [] if in_lists else {}
    for _ in range(depth - 1):
        value = [value] if in_lists else {"a": value}
    return value


# The deepest JSON a request may carry with JSON_HEADROOM = 20 of protobuf's levels left: 27
# objects (3 levels each, less one) = 79 levels; in a Struct's field, 39 arrays (2 each) + 3.
assert JSON_HEADROOM == 20
MOST_OBJECTS = 27
MOST_ARRAYS_IN_A_FIELD = 39


async def test_json_nested_past_the_limit_is_refused_and_the_limit_leaves_answers_room(
    session_runner: ServiceRunner, sessions: session_pb2_grpc.SessionServiceStub
) -> None:
    created = await sessions.CreateSession(session_pb2.CreateSessionRequest(), metadata=identity())
    session_id = length_delimited(1, created.session.id.encode())
    async with aio.insecure_channel(f"127.0.0.1:{session_runner.port}") as channel:
        error = await call_raw(
            channel, SESSION, session_id + length_delimited(2, nested_struct(MOST_OBJECTS + 1))
        )
        # Decodes (protobuf's own limit is further), but an answer carrying it might not.
        await channel.unary_unary(SESSION.method)(
            session_id + length_delimited(2, nested_struct(MOST_OBJECTS)), metadata=identity()
        )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error_details(error)
    assert details["ErrorInfo"].reason == "INVALID_ARGUMENT"  # type: ignore[attr-defined]
    assert details["BadRequest"].field_violations[0].field == "context"  # type: ignore[attr-defined]
    # The stored context comes back one level deeper (GetSessionResponse.session.context).
    stored = await sessions.GetSession(
        session_pb2.GetSessionRequest(session_id=created.session.id), metadata=identity()
    )
    assert json_format.MessageToDict(stored.session.context) == nested_json(MOST_OBJECTS)


def struct_of(value: dict[str, object]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(value)  # type: ignore[arg-type]
    return struct


def test_json_depth_counts_arrays_and_finds_json_in_lists_and_maps() -> None:
    deep = struct_of({"a": nested_json(MOST_ARRAYS_IN_A_FIELD + 1, in_lists=True)})
    fits = struct_of({"a": nested_json(MOST_ARRAYS_IN_A_FIELD, in_lists=True), "n": 1})
    listed = session_pb2.ListSessionsResponse(
        sessions=[session_pb2.Session(context=fits), session_pb2.Session(context=deep)]
    )
    with pytest.raises(InvalidArgument) as refused:
        check_json_depth(listed)
    assert refused.value.field == "sessions.context"
    mapped = base_pb2.Metadata(filter_metadata={"ok": fits, "deep": deep})
    with pytest.raises(InvalidArgument) as refused:
        check_json_depth(mapped)
    assert refused.value.field == "filter_metadata"
    check_json_depth(base_pb2.Metadata(filter_metadata={"ok": fits}))
    check_json_depth(session_pb2.ListSessionsResponse(sessions=[session_pb2.Session()]))
    # A ListValue or a Value of their own (the fields of a Value, the items of a ListValue).
    arrays = struct_pb2.ListValue()
    arrays.extend([nested_json(MOST_ARRAYS_IN_A_FIELD, in_lists=True)])
    check_json_depth(struct_pb2.Value(list_value=arrays))
    arrays.extend([nested_json(MOST_ARRAYS_IN_A_FIELD + 2, in_lists=True)])
    with pytest.raises(InvalidArgument) as refused:
        check_json_depth(struct_pb2.Value(list_value=arrays))
    assert refused.value.field == "list_value"
    with pytest.raises(InvalidArgument) as refused:
        check_json_depth(arrays)
    assert refused.value.field == "values"


Probe = health_pb2.HealthCheckRequest
"""The probe server's one message type: ``service`` carries the text."""


async def broken_answer(request: Probe, context: object) -> object:
    return {"service": request.service}  # a dict where the response message belongs


async def count(requests: AsyncIterator[Probe], context: object) -> Probe:
    return Probe(service=str(len([r async for r in requests])))


async def echo(requests: AsyncIterator[Probe], context: object) -> AsyncIterator[Probe]:
    async for request in requests:
        yield request


async def write_twice(request: Probe, context: aio.ServicerContext[Probe, Probe]) -> None:
    for _ in range(2):
        await context.write(request)


PROBE_METHODS: dict[str, tuple[Callable[..., grpc.RpcMethodHandler], Callable[..., object]]] = {
    "BrokenAnswer": (grpc.unary_unary_rpc_method_handler, broken_answer),
    "Count": (grpc.stream_unary_rpc_method_handler, count),
    "Echo": (grpc.stream_stream_rpc_method_handler, echo),
    "WriteTwice": (grpc.unary_stream_rpc_method_handler, write_twice),
}


@asynccontextmanager
async def probe_server() -> AsyncIterator[aio.Channel]:
    """A server with one method of each RPC shape (client streaming has no service yet)."""
    handler = grpc.method_handlers_generic_handler(
        "opsmesh.test.Probe",
        {
            name: make(
                behaviour,
                request_deserializer=Probe.FromString,
                response_serializer=Probe.SerializeToString,
            )
            for name, (make, behaviour) in PROBE_METHODS.items()
        },
    )
    runner = ServiceRunner(
        settings=ServerSettings(port=0, grace_period=0.5),
        registrations=[
            Registration(
                service_name="opsmesh.test.Probe",
                add_to_server=lambda server: server.add_generic_rpc_handlers((handler,)),
            )
        ],
        authenticator=authenticator_from_mode("trusted-headers"),
        options=FAST_HEALTH,
    )
    await runner.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel:
            yield channel
    finally:
        await runner.stop()


def probe(text: str) -> bytes:
    return Probe(service=text).SerializeToString()


async def test_an_answer_that_cannot_be_encoded_is_internal_without_internals(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with probe_server() as channel:
        with pytest.raises(aio.AioRpcError) as failed:
            await channel.unary_unary("/opsmesh.test.Probe/BrokenAnswer")(
                probe("x"), metadata=identity(), timeout=10
            )
    assert failed.value.code() == grpc.StatusCode.INTERNAL
    assert failed.value.details() == "internal error; the server logged the details"
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.name for r in logged] == ["opsmesh.rpc"]  # once, by the mesh, with the trace
    assert logged[0].exc_info is not None


async def test_every_rpc_shape_decodes_and_encodes_inside_the_rpc() -> None:
    async with probe_server() as channel:
        counted = channel.stream_unary("/opsmesh.test.Probe/Count")
        assert await counted(iter([probe("a"), probe("b")]), metadata=identity()) == probe("2")
        with pytest.raises(aio.AioRpcError) as refused:
            await counted(iter([probe("a"), truncated(SESSION)]), metadata=identity())
        assert_malformed_answer(refused.value)
        echoed = channel.stream_stream("/opsmesh.test.Probe/Echo")(
            iter([probe("a"), probe("b")]), metadata=identity()
        )
        assert [answer async for answer in echoed] == [probe("a"), probe("b")]
        written = channel.unary_stream("/opsmesh.test.Probe/WriteTwice")(
            probe("w"), metadata=identity()
        )
        assert [answer async for answer in written] == [probe("w")] * 2


async def test_health_watch_streams_through_the_interceptors(
    session_runner: ServiceRunner,
) -> None:
    """Health's Watch sends with context.write() rather than yielding its answers."""
    async with aio.insecure_channel(f"127.0.0.1:{session_runner.port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())

        async def serving() -> None:
            answer = await watch.read()
            assert answer.status == health_pb2.HealthCheckResponse.SERVING, answer

        await assert_eventually(serving)
        watch.cancel()


# ---- The real Envoy edge (tests/test_edge.py's stack: session_svc in JWT mode behind it) ----


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def test_a_malformed_request_through_the_edge_is_invalid_argument(
    edge: Edge,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with aio.insecure_channel(edge.grpc_address) as channel:
        for payload in MALFORMED:
            try:
                await channel.unary_unary(SESSION.method)(
                    payload(SESSION), metadata=bearer(edge.token()), timeout=10
                )
            except aio.AioRpcError as error:
                assert_malformed_answer(error)
            else:
                raise AssertionError(f"the edge passed {payload.__name__} as a valid request")
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def claims(signer: Edge, **more: object) -> dict[str, object]:
    now = int(time.time())
    return {
        "iss": signer.issuer,
        "aud": "opsmesh",
        "sub": "ada",
        "org_id": "acme",
        "roles": [],
        "jti": uuid.uuid4().hex,
        "iat": now,
        "nbf": now,
        **more,
    }


async def test_the_edge_refuses_a_token_without_expiry(edge: Edge) -> None:  # noqa: F811
    async with aio.insecure_channel(edge.grpc_address) as channel:
        sessions = session_pb2_grpc.SessionServiceStub(channel)
        request = session_pb2.ListSessionsRequest()
        expiring = edge.ring.sign(claims(edge, exp=int(time.time()) + 300))
        await sessions.ListSessions(request, metadata=bearer(expiring), timeout=10)
        with pytest.raises(aio.AioRpcError) as refused:
            await sessions.ListSessions(
                request, metadata=bearer(edge.ring.sign(claims(edge))), timeout=10
            )
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Envoy's own answer: the token never reached session_svc.
    answer = dict(refused.value.trailing_metadata() or ())
    assert 'error="invalid_token"' in str(answer.get("www-authenticate"))
    assert "x-envoy-upstream-service-time" not in answer


FLOOD = tuple((f"x-flood-{i}", "v") for i in range(3000))


async def test_a_header_flood_is_resource_exhausted_for_grpc(
    edge: Edge,  # noqa: F811
) -> None:
    async with aio.insecure_channel(edge.grpc_address) as channel:
        sessions = session_pb2_grpc.SessionServiceStub(channel)
        request = session_pb2.ListSessionsRequest()
        # Well under the limit: served.
        await sessions.ListSessions(request, metadata=bearer(edge.token()) + FLOOD[:60], timeout=10)
        with pytest.raises(aio.AioRpcError) as refused:
            await sessions.ListSessions(request, metadata=bearer(edge.token()) + FLOOD, timeout=10)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "100 headers" in (refused.value.details() or "")


async def test_a_header_flood_is_resource_exhausted_for_grpc_web_and_431_for_http(
    edge: Edge,  # noqa: F811
) -> None:
    origin = "http://localhost:5173"
    web = await edge.http.post(
        SESSION.method.replace("UpdateContext", "ListSessions"),
        content=grpc_web_frame(b""),
        headers={
            "origin": origin,
            "content-type": "application/grpc-web+proto",
            "x-grpc-web": "1",
            "authorization": f"Bearer {edge.token()}",
            **dict(FLOOD),
        },
    )
    assert web.status_code == 200
    assert web.headers["grpc-status"] == str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
    # The browser may read it (CORS ran before the limit).
    assert web.headers["access-control-allow-origin"] == origin
    page = await edge.http.get("/", headers=dict(FLOOD))
    assert page.status_code == 431
