"""The shared server runtime: interceptor, health, reflection, metrics, graceful drain."""

from __future__ import annotations

import asyncio
import gc
import urllib.request
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import empty_pb2, wrappers_pb2
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import generate_latest

from devtools.servers import free_port
from mesh.auth import TrustedHeaderAuthenticator
from mesh.context import current_principal
from mesh.errors import NotFound
from mesh.health import Probe
from mesh.server import Registration, RunnerOptions, ServiceRunner
from mesh.settings import ServerSettings
from tests.helpers import assert_eventually, identity

SERVICE = "opsmesh.test.v1.ProbeService"


class ProbeBehaviours:
    """Handlers of a test-only service that exercise every path of the interceptor."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.entered = asyncio.Event()
        self.healthy = True

    async def whoami(
        self, request: empty_pb2.Empty, context: aio.ServicerContext
    ) -> wrappers_pb2.StringValue:
        principal = current_principal()
        return wrappers_pb2.StringValue(value=f"{principal.user_id}@{principal.org_id}")

    async def slow(self, request: empty_pb2.Empty, context: aio.ServicerContext) -> empty_pb2.Empty:
        self.entered.set()
        await self.release.wait()
        return empty_pb2.Empty()

    async def boom(self, request: empty_pb2.Empty, context: aio.ServicerContext) -> empty_pb2.Empty:
        raise RuntimeError("secret internal detail")

    async def abort(
        self, request: empty_pb2.Empty, context: aio.ServicerContext
    ) -> empty_pb2.Empty:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "handler aborted")
        raise AssertionError("unreachable")

    async def count(
        self, request: wrappers_pb2.Int32Value, context: aio.ServicerContext
    ) -> AsyncIterator[wrappers_pb2.Int32Value]:
        for i in range(request.value):
            yield wrappers_pb2.Int32Value(value=i)
        raise NotFound("ran out of numbers")

    async def count_boom(
        self, request: wrappers_pb2.Int32Value, context: aio.ServicerContext
    ) -> AsyncIterator[wrappers_pb2.Int32Value]:
        yield wrappers_pb2.Int32Value(value=1)
        raise RuntimeError("stream broke")

    async def check(self) -> None:
        if not self.healthy:
            raise ConnectionError("probe dependency down")

    def registration(self) -> Registration:
        empty = (empty_pb2.Empty.FromString, empty_pb2.Empty.SerializeToString)
        handlers = {
            "WhoAmI": grpc.unary_unary_rpc_method_handler(
                self.whoami, empty[0], wrappers_pb2.StringValue.SerializeToString
            ),
            "Slow": grpc.unary_unary_rpc_method_handler(self.slow, *empty),
            "Boom": grpc.unary_unary_rpc_method_handler(self.boom, *empty),
            "Abort": grpc.unary_unary_rpc_method_handler(self.abort, *empty),
            "Count": grpc.unary_stream_rpc_method_handler(
                self.count,
                wrappers_pb2.Int32Value.FromString,
                wrappers_pb2.Int32Value.SerializeToString,
            ),
            "CountBoom": grpc.unary_stream_rpc_method_handler(
                self.count_boom,
                wrappers_pb2.Int32Value.FromString,
                wrappers_pb2.Int32Value.SerializeToString,
            ),
        }
        return Registration(
            service_name=SERVICE,
            add_to_server=lambda server: server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler(SERVICE, handlers),)
            ),
        )


def probe_runner(behaviours: ProbeBehaviours, **settings: object) -> ServiceRunner:
    return ServiceRunner(
        settings=ServerSettings(port=0, **settings),  # type: ignore[arg-type]
        registrations=[behaviours.registration()],
        authenticator=TrustedHeaderAuthenticator(),
        probes=[Probe(name="probe", check=behaviours.check)],
        options=RunnerOptions(health_interval=0.05, health_timeout=0.5),
    )


@pytest.fixture
async def probe_server() -> AsyncIterator[tuple[ServiceRunner, ProbeBehaviours, aio.Channel]]:
    behaviours = ProbeBehaviours()
    runner = probe_runner(behaviours, grace_period=5.0, metrics_port=free_port(), access_log=True)
    await runner.start()
    async with aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel:
        yield runner, behaviours, channel
    behaviours.release.set()
    await runner.stop()


def unary(channel: aio.Channel, method: str, response=empty_pb2.Empty):
    return channel.unary_unary(
        f"/{SERVICE}/{method}",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response.FromString,
    )


def stream(channel: aio.Channel, method: str):
    return channel.unary_stream(
        f"/{SERVICE}/{method}",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=wrappers_pb2.Int32Value.FromString,
    )


async def collect(call: AsyncIterator[wrappers_pb2.Int32Value], sink: list[int]) -> None:
    async for item in call:
        sink.append(item.value)


async def health(channel: aio.Channel, service: str = "") -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=2
    )
    return reply.status


async def test_principal_reaches_the_handler_and_request_id_is_echoed(probe_server) -> None:
    _, _, channel = probe_server
    call = unary(channel, "WhoAmI", wrappers_pb2.StringValue)(
        empty_pb2.Empty(), metadata=(*identity("ada", "lovelace"), ("x-request-id", "req-123"))
    )
    assert (await call).value == "ada@lovelace"
    assert ("x-request-id", "req-123") in list(await call.trailing_metadata())


async def test_requests_without_an_id_get_a_distinct_one(probe_server) -> None:
    _, _, channel = probe_server
    given = []
    for _ in range(3):
        call = unary(channel, "WhoAmI", wrappers_pb2.StringValue)(
            empty_pb2.Empty(), metadata=identity("ada", "lovelace")
        )
        await call
        given += [v for k, v in await call.trailing_metadata() if k == "x-request-id"]
    assert len(given) == 3
    assert len(set(given)) == 3
    assert all(len(v) == 32 and int(v, 16) >= 0 for v in given)


async def test_unexpected_errors_are_internal_without_leaking_details(probe_server, caplog) -> None:
    _, _, channel = probe_server
    with pytest.raises(aio.AioRpcError) as caught:
        await unary(channel, "Boom")(empty_pb2.Empty(), metadata=identity())
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in (caught.value.details() or "")
    assert any("secret internal detail" in r.getMessage() or r.exc_info for r in caplog.records)
    with pytest.raises(aio.AioRpcError) as caught:
        await unary(channel, "Abort")(empty_pb2.Empty(), metadata=identity())
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_streams_map_errors_after_partial_results(probe_server) -> None:
    _, _, channel = probe_server
    received = []
    call = stream(channel, "Count")(wrappers_pb2.Int32Value(value=3), metadata=identity())
    with pytest.raises(aio.AioRpcError) as caught:
        await collect(call, received)
    assert received == [0, 1, 2]
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(aio.AioRpcError) as caught:
        async for _ in stream(channel, "CountBoom")(wrappers_pb2.Int32Value(), metadata=identity()):
            pass
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    with pytest.raises(aio.AioRpcError) as caught:
        async for _ in stream(channel, "Count")(wrappers_pb2.Int32Value(value=1)):
            pass
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_health_and_reflection_need_no_credentials(probe_server) -> None:
    _, _, channel = probe_server
    assert await health(channel) == health_pb2.HealthCheckResponse.SERVING
    assert await health(channel, SERVICE) == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    names: list[str] = []
    async for reply in stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    ):
        names += [s.name for s in reply.list_services_response.service]
    assert set(names) >= {
        SERVICE,
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }


async def test_health_follows_the_dependency_probes(probe_server) -> None:
    _, behaviours, channel = probe_server
    behaviours.healthy = False

    async def not_serving() -> None:
        assert await health(channel, SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING

    await assert_eventually(not_serving, timeout=5)
    assert await health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
    behaviours.healthy = True

    async def serving() -> None:
        assert await health(channel, SERVICE) == health_pb2.HealthCheckResponse.SERVING

    await assert_eventually(serving, timeout=5)


async def test_metrics_count_each_rpc_by_code_and_are_served_over_http(probe_server) -> None:
    runner, _, channel = probe_server
    await unary(channel, "WhoAmI", wrappers_pb2.StringValue)(empty_pb2.Empty(), metadata=identity())
    with pytest.raises(aio.AioRpcError):
        await unary(channel, "WhoAmI", wrappers_pb2.StringValue)(empty_pb2.Empty())
    text = generate_latest(runner.registry).decode()
    base = f'grpc_method="WhoAmI",grpc_service="{SERVICE}",grpc_type="unary"'
    assert f'grpc_server_handled_total{{grpc_code="OK",{base}}} 1.0' in text
    assert f'grpc_server_handled_total{{grpc_code="UNAUTHENTICATED",{base}}} 1.0' in text
    assert f"grpc_server_started_total{{{base}}} 2.0" in text
    assert f"grpc_server_in_flight{{{base}}} 0.0" in text
    assert f"grpc_server_handling_seconds_count{{{base}}} 2.0" in text
    url = f"http://127.0.0.1:{runner.metrics_port}/metrics"
    body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    assert "grpc_server_handled_total" in body


async def test_stop_drains_in_flight_rpcs_and_refuses_new_ones() -> None:
    behaviours = ProbeBehaviours()
    runner = probe_runner(behaviours, grace_period=5.0, drain_delay=0.5)
    await runner.start()
    async with aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel:
        in_flight = asyncio.ensure_future(
            unary(channel, "Slow")(empty_pb2.Empty(), metadata=identity())
        )
        await behaviours.entered.wait()
        stopping = asyncio.ensure_future(runner.stop())

        async def draining() -> None:
            assert await health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING

        # During the drain delay load balancers see NOT_SERVING while calls still work.
        await assert_eventually(draining, timeout=2, interval=0.01)

        async def refused() -> None:
            try:
                await unary(channel, "WhoAmI", wrappers_pb2.StringValue)(
                    empty_pb2.Empty(), metadata=identity(), timeout=1
                )
            except aio.AioRpcError as error:
                assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
            else:
                raise AssertionError("still accepting new calls")

        # After the drain delay the server refuses new calls.
        await assert_eventually(refused, timeout=3, interval=0.05)
        assert not in_flight.done(), "the in-flight RPC is still running"
        behaviours.release.set()
        await in_flight  # completes OK within the grace period
        await stopping


async def test_serve_until_signalled_stops_on_request() -> None:
    runner = ServiceRunner(
        settings=ServerSettings(port=0, grace_period=1.0, drain_delay=0.05),
        registrations=[ProbeBehaviours().registration()],
        authenticator=TrustedHeaderAuthenticator(),
        options=RunnerOptions(on_stop=(_failing_cleanup,)),
    )
    gc.unfreeze()
    task = asyncio.ensure_future(runner.serve_until_signalled())

    async def started() -> None:
        assert runner.port > 0
        # What start-up built is out of the cyclic collector's sight while the process serves.
        assert gc.get_freeze_count() > 0

    try:
        await assert_eventually(started)
    finally:
        gc.unfreeze()  # this test process goes on
    runner.request_stop()
    await asyncio.wait_for(task, 5)
    await runner.stop()  # idempotent


async def _failing_cleanup() -> None:
    raise RuntimeError("cleanup failed; logged, shutdown goes on")
