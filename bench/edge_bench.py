"""What the edge costs: unary RPCs straight to the session service vs through Envoy with
jwt_authn and global rate limiting, and ShouldRateLimit on its own, in one run.

Every process is real: identity_svc (the issuer), session_svc (verifying JWTs itself),
ratelimit_svc on Redis, Envoy with envoy/envoy.yaml (ports moved). Prints p50/p99 latency
(sequential) and throughput (32 concurrent callers) for both paths and the latency Envoy adds.
Target: Envoy + JWT + rate limiting adds <= 2 ms p50.

    .venv/bin/python bench/edge_bench.py [--samples 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import tempfile
from pathlib import Path

import uvloop
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from grpc import aio
from measure import latencies, percentile, throughput

from devtools.edge import EdgeTopology, envoy_process, free_edge_ports, render
from devtools.servers import ManagedProcess, RedisServer
from identity_svc.keys import KeyRing, issue_access_token
from mesh.context import Principal
from opsmesh.session.v1 import session_pb2, session_pb2_grpc


async def run(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="edge-bench-"))
    redis = RedisServer(workdir / "redis").start()
    ports = free_edge_ports()
    issuer = f"http://127.0.0.1:{ports['identity_http']}"
    env = dict(
        os.environ,
        OPSMESH_REDIS_URL=redis.url,
        OPSMESH_METRICS_PORT="0",
        OPSMESH_AUTH_MODE="jwt",
        OPSMESH_JWT_ISSUER=issuer,
        OPSMESH_JWT_KEYS_DIR=str(workdir / "keys"),
        OPSMESH_LOG_LEVEL="INFO",
    )
    rules = workdir / "rules.toml"
    rules.write_text(
        '[[rule]]\nname = "u"\nkeys = ["user"]\nrequests_per_unit = 100000000\nunit = "hour"\n'
    )
    identity = ManagedProcess(
        "identity_svc",
        [sys.executable, "-m", "identity_svc"],
        log_path=workdir / "identity.log",
        ready=re.compile("serving opsmesh"),
        env=dict(
            env, OPSMESH_GRPC_PORT="0", OPSMESH_IDENTITY_HTTP_PORT=str(ports["identity_http"])
        ),
    )
    session = ManagedProcess(
        "session_svc",
        [sys.executable, "-m", "session_svc"],
        log_path=workdir / "session.log",
        ready=re.compile("serving opsmesh"),
        env=dict(
            env, OPSMESH_GRPC_PORT=str(ports["session"]), OPSMESH_REVOCATION_FEED_URL=redis.url
        ),
    )
    ratelimit = ManagedProcess(
        "ratelimit_svc",
        [sys.executable, "-m", "ratelimit_svc"],
        log_path=workdir / "rl.log",
        ready=re.compile("serving envoy"),
        env=dict(
            env, OPSMESH_GRPC_PORT=str(ports["ratelimit"]), OPSMESH_RATELIMIT_RULES=str(rules)
        ),
    )
    config = workdir / "envoy.yaml"
    config.write_text(render(EdgeTopology.dev(ports, issuer=issuer)))
    envoy = envoy_process(config, workdir / "envoy.log")
    processes = [identity, session, ratelimit, envoy]
    for process in processes:
        process.start(timeout=60)
    try:
        ring = KeyRing(workdir / "keys")
        token = issue_access_token(
            ring, Principal("bench", "bench-org"), issuer=issuer, audience="opsmesh", ttl=3600
        )
        metadata = (("authorization", f"Bearer {token}"),)
        async with aio.insecure_channel(f"127.0.0.1:{ports['session']}") as direct_channel, \
                aio.insecure_channel(f"127.0.0.1:{ports['edge']}") as edge_channel, \
                aio.insecure_channel(f"127.0.0.1:{ports['ratelimit']}") as rl_channel:  # fmt: skip
            direct = session_pb2_grpc.SessionServiceStub(direct_channel)
            sid = (
                await direct.CreateSession(session_pb2.CreateSessionRequest(), metadata=metadata)
            ).session.id
            request = session_pb2.GetSessionRequest(session_id=sid)
            edge = session_pb2_grpc.SessionServiceStub(edge_channel)
            for _ in range(100):  # until Envoy has fetched the JWKS
                try:
                    await edge.GetSession(request, metadata=metadata)
                    break
                except aio.AioRpcError:
                    await asyncio.sleep(0.1)
            limiter = rls_pb2_grpc.RateLimitServiceStub(rl_channel)
            rl_request = rls_pb2.RateLimitRequest(
                domain="opsmesh",
                descriptors=[
                    ratelimit_pb2.RateLimitDescriptor(
                        entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key="user", value="bench")]
                    )
                ],
            )

            async def via_direct() -> object:
                return await direct.GetSession(request, metadata=metadata)

            async def via_edge() -> object:
                return await edge.GetSession(request, metadata=metadata)

            async def should_rate_limit() -> object:
                return await limiter.ShouldRateLimit(rl_request)

            results = {}
            for name, call in (
                ("direct to session_svc", via_direct),
                ("through Envoy (JWT + RLS)", via_edge),
                ("ShouldRateLimit alone", should_rate_limit),
            ):
                samples = [seconds * 1000 for seconds in await latencies(call, args.samples)]
                results[name] = (
                    percentile(samples, 0.5),
                    percentile(samples, 0.99),
                    await throughput(call, 4.0, 32),
                )
    finally:
        for process in reversed(processes):
            process.stop()
        redis.stop()
    print(
        f"edge bench: GetSession, {args.samples} sequential calls, 32 concurrent for throughput\n"
    )
    print(f"{'path':<30}{'p50 ms':>9}{'p99 ms':>9}{'calls/s':>10}")
    for name, (p50, p99, rate) in results.items():
        print(f"{name:<30}{p50:>9.2f}{p99:>9.2f}{rate:>10.0f}")
    added = results["through Envoy (JWT + RLS)"][0] - results["direct to session_svc"][0]
    ratio = results["through Envoy (JWT + RLS)"][2] / results["direct to session_svc"][2]
    print(
        f"\nEnvoy + JWT + rate limiting adds {added:.2f} ms p50 (target <= 2 ms); "
        f"throughput {ratio:.2f}x of direct"
    )
    return 0 if added <= 2 else 1


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=2000)
    raise SystemExit(uvloop.run(run(parser.parse_args())))


if __name__ == "__main__":
    main()
