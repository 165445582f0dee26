"""What safe decoding costs: unary RPCs with and without the WireCodecInterceptor, and Envoy
with and without its header_limits filter, side by side in one run.

1. Two in-process servers with the mesh's RpcInterceptor, one also with the
   WireCodecInterceptor (requests decoded and answers encoded inside the RPC, JSON depth
   checked): Health/Check (no JSON) and an UpdateContextRequest carrying a 60-value Struct.
2. Two real Envoys rendered from envoy/envoy.yaml, one with the header_limits (Lua) filter
   removed, in front of the same health-only backend: Health/Check through each (a public
   route, so jwt_authn and the rate limit filter pass it without a call out).

Prints p50/p99 latency (sequential), throughput (32 concurrent callers) and the ratios: the
median of alternating rounds, since the variants run side by side on a possibly busy machine.

    .venv/bin/python bench/codec_bench.py [--samples 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import grpc
import httpx
import uvloop
from grpc import aio
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc
from measure import latencies, percentile, throughput
from prometheus_client import CollectorRegistry

from devtools.edge import EdgeTopology, envoy_process, free_edge_ports, render
from devtools.servers import free_port
from mesh.auth import authenticator_from_mode
from mesh.metrics import RpcMetrics
from mesh.rpc import RpcInterceptor, WireCodecInterceptor
from mesh.server import ServiceRunner
from mesh.settings import ServerSettings
from opsmesh.session.v1 import session_pb2

Call = Callable[[], Awaitable[object]]
LUA_FILTER = re.compile(r"\n( +)- name: header_limits\n.*?(?=\n\1- name: )", re.DOTALL)


async def update_context(
    request: session_pb2.UpdateContextRequest, context: object
) -> session_pb2.UpdateContextResponse:
    return session_pb2.UpdateContextResponse()


def probe_handlers() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        "opsmesh.bench.Probe",
        {
            "UpdateContext": grpc.unary_unary_rpc_method_handler(
                update_context,
                request_deserializer=session_pb2.UpdateContextRequest.FromString,
                response_serializer=session_pb2.UpdateContextResponse.SerializeToString,
            )
        },
    )


async def mesh_server(interceptors: Sequence[Any]) -> tuple[aio.Server, int]:
    """Health plus the probe, behind ``interceptors`` (as mesh.server builds them)."""
    server = aio.server(interceptors=interceptors)
    server.add_generic_rpc_handlers((probe_handlers(),))
    health = grpc_health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def interceptor_stacks() -> dict[str, list[Any]]:
    def rpc() -> RpcInterceptor:
        return RpcInterceptor(
            authenticator=authenticator_from_mode("trusted-headers"),
            metrics=RpcMetrics(CollectorRegistry()),
        )

    return {
        "RpcInterceptor only": [rpc()],
        "+ WireCodecInterceptor": [rpc(), WireCodecInterceptor()],
    }


def context_request() -> bytes:
    request = session_pb2.UpdateContextRequest(session_id="s" * 36)
    request.context.update({f"key{i}": {"nested": [i, str(i), {"deep": True}]} for i in range(20)})
    return request.SerializeToString()


Result = tuple[float, float, float]  # p50 ms, p99 ms, calls/s


async def alternating(calls: dict[str, Call], samples: int, rounds: int) -> dict[str, Result]:
    """Each call measured ``rounds`` times, the variants taking turns (a busy machine drifts);
    the median round of each figure."""
    seen: dict[str, list[Result]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            millis = [seconds * 1000 for seconds in await latencies(call, samples)]
            rate = await throughput(call, 2.0, 32)
            seen[name].append((percentile(millis, 0.5), percentile(millis, 0.99), rate))
    return {
        name: (
            statistics.median(r[0] for r in results),
            statistics.median(r[1] for r in results),
            statistics.median(r[2] for r in results),
        )
        for name, results in seen.items()
    }


async def codec_results(samples: int, rounds: int) -> dict[str, Result]:
    payload = context_request()
    identity = (("x-opsmesh-user-id", "bench"), ("x-opsmesh-org-id", "bench"))
    calls: dict[str, Call] = {}
    async with AsyncExitStack() as stack:
        for name, interceptors in interceptor_stacks().items():
            server, port = await mesh_server(interceptors)
            stack.push_async_callback(server.stop, None)
            channel = await stack.enter_async_context(aio.insecure_channel(f"127.0.0.1:{port}"))
            check = health_pb2_grpc.HealthStub(channel).Check
            update = channel.unary_unary("/opsmesh.bench.Probe/UpdateContext")

            async def health(check: Any = check) -> object:
                return await check(health_pb2.HealthCheckRequest())

            async def with_struct(update: Any = update) -> object:
                return await update(payload, metadata=identity)

            calls[f"{name}: Health/Check"] = health
            calls[f"{name}: UpdateContext+Struct"] = with_struct
        return await alternating(calls, samples, rounds)


async def edge_results(samples: int, rounds: int, workdir: Path) -> dict[str, Result]:
    """Two Envoys, with and without the header_limits filter, before one health backend."""
    ports = free_edge_ports()
    backend = ServiceRunner(
        settings=ServerSettings(port=ports["edgeinfo"]),
        registrations=[],
        authenticator=authenticator_from_mode("trusted-headers"),
    )
    await backend.start()
    config = render(EdgeTopology.dev(ports))
    without = dict(ports, edge=free_port(), admin=free_port())
    variants = {
        "Envoy without header_limits": (
            without,
            LUA_FILTER.sub("", render(EdgeTopology.dev(without)), count=1),
        ),
        "Envoy with header_limits (Lua)": (ports, config),
    }
    assert "lua.v3.Lua" not in variants["Envoy without header_limits"][1]
    calls: dict[str, Call] = {}
    async with AsyncExitStack() as stack:
        stack.push_async_callback(backend.stop)
        for index, (name, (moved, text)) in enumerate(variants.items()):
            path = workdir / f"envoy{index}.yaml"
            path.write_text(text)
            envoy = envoy_process(path, workdir / f"envoy{index}.log")
            envoy.start(timeout=30)
            stack.callback(envoy.stop)
            await wait_live(moved["admin"])
            channel = aio.insecure_channel(f"127.0.0.1:{moved['edge']}")
            await stack.enter_async_context(channel)
            check = health_pb2_grpc.HealthStub(channel).Check

            async def health(check: Any = check) -> object:
                return await check(health_pb2.HealthCheckRequest(), timeout=5)

            calls[name] = health
        return await alternating(calls, samples, rounds)


async def wait_live(admin_port: int) -> None:
    async with httpx.AsyncClient() as admin:
        for _ in range(200):
            try:
                reply = await admin.get(f"http://127.0.0.1:{admin_port}/ready")
                if reply.text.strip() == "LIVE":
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("Envoy never became LIVE")


def report(title: str, results: dict[str, Result], new: str, old: str) -> None:
    print(f"\n{title}")
    print(f"{'path':<50}{'p50 ms':>9}{'p99 ms':>9}{'calls/s':>10}")
    for name, (p50, p99, rate) in results.items():
        print(f"{name:<50}{p50:>9.3f}{p99:>9.3f}{rate:>10.0f}")
    for suffix in ("", *sorted({n.split(": ")[1] for n in results if ": " in n})):
        after, before = (f"{new}: {suffix}", f"{old}: {suffix}") if suffix else (new, old)
        if after in results and before in results:
            print(
                f"  {suffix or 'ratio'}: p50 {results[after][0] / results[before][0]:.2f}x, "
                f"throughput {results[after][2] / results[before][2]:.2f}x of the baseline"
            )


async def run(args: argparse.Namespace) -> int:
    codec = await codec_results(args.samples, args.rounds)
    workdir = Path(tempfile.mkdtemp(prefix="codec-bench-"))
    edge = await edge_results(args.samples, args.rounds, workdir)
    print(
        f"codec bench: {args.samples} sequential calls, 32 concurrent callers for throughput; "
        f"median of {args.rounds} alternating rounds"
    )
    report("In-process server (client in the same process)", codec,
           "+ WireCodecInterceptor", "RpcInterceptor only")  # fmt: skip
    report("Through Envoy (Health/Check, public route)", edge,
           "Envoy with header_limits (Lua)", "Envoy without header_limits")  # fmt: skip
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    raise SystemExit(uvloop.run(run(parser.parse_args())))


if __name__ == "__main__":
    main()
