"""GetSession / UpdateContext through the gRPC session service vs redis-py directly.

One run, side by side:
* baseline: the same Redis operations (the service's own Lua scripts, via
  ``SessionStore`` on the service's own client) called straight from redis-py,
  no gRPC in between;
* service: the real ``python -m session_svc`` process (pinned to one core)
  called over gRPC on loopback.
Prints p50/p99 latency (sequential calls) and throughput (concurrent calls)
for both, and the ratios against the issue's targets:
gRPC GetSession p50 within 4x of the raw Redis round trip, >= 3,000
GetSession/s with the service on one core, and (issue #18) GetSession p50 within
1.3x of a bare grpc.aio health check on the same channel. Wall-clock latency is
noisy on a shared machine, so it also prints the service's CPU per call (its own
/proc counters) for the health check and GetSession, side by side, and what bounds
the ratio: the CPU a sequential GetSession costs the service beyond the health
check, split into the Redis call (the same ``SessionStore.get`` priced in this
process by its own counters) and the rest; the same by component (kernel, Python,
gRPC core, uvloop, protobuf) from ``perf`` samples of the service when ``perf`` is
installed; and the p50 a GetSession would have if the service added nothing but
its one Redis round trip to the health check.

    .venv/bin/python bench/session_bench.py [--seconds 5] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import uvloop
from google.protobuf import struct_pb2
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from measure import cpu_seconds, latencies, percentile, throughput

from devtools.servers import ManagedProcess, RedisServer, free_port
from mesh.auth import ORG_HEADER, USER_HEADER
from mesh.context import Principal
from mesh.redisconn import RedisSettings, connect_redis
from opsmesh.session.v1 import session_pb2 as pb
from opsmesh.session.v1 import session_pb2_grpc
from session_svc.store import SessionStore, VersionConflict

OWNER = Principal("bench-user", "bench-org")
METADATA = ((USER_HEADER, OWNER.user_id), (ORG_HEADER, OWNER.org_id))
CONTEXT = {"topic": "checkout latency", "services": ["api", "db"], "window": "15m", "step": 1}


def pct(samples: list[float], q: float) -> float:
    return percentile(samples, q) * 1e6


class _Counted:
    """A bench call that counts how often it ran (to price the service's CPU per call)."""

    def __init__(self, call: Callable[[], Awaitable[object]]) -> None:
        self._call = call
        self.calls = 0

    async def __call__(self) -> object:
        self.calls += 1
        return await self._call()


def pin(pid: int, cpu: int) -> bool:
    try:
        os.sched_setaffinity(pid, {cpu % (os.cpu_count() or 1)})
    except (AttributeError, OSError):
        return False
    return True


async def run(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="session-bench-"))
    redis_server = RedisServer(workdir / "redis").start()
    assert redis_server.process is not None
    port = free_port()
    env = dict(
        os.environ,
        OPSMESH_GRPC_PORT=str(port),
        OPSMESH_METRICS_PORT="0",
        OPSMESH_JWT_KEYS_DIR=str(workdir / "keys"),
        OPSMESH_REDIS_URL=redis_server.url,
        # A shared machine can stall Redis past the 1 s default: the bench measures latency,
        # and one stall must not end the run with UNAVAILABLE.
        OPSMESH_REDIS_TIMEOUT="10",
        OPSMESH_LOG_LEVEL="INFO",
        OPSMESH_SESSION_KEY_PREFIX="bench:",
    )
    service = ManagedProcess(
        "session_svc",
        [sys.executable, "-m", "session_svc"],
        log_path=workdir / "session.log",
        ready=re.compile(r"serving opsmesh\.session\.v1\.SessionService"),
        env=env,
    )
    # Service alone on core 0; Redis and this load generator on the other core.
    service.start()
    pinned = pin(service.pid, 0)
    pin(redis_server.process.pid, 1)
    pin(0, 1)
    results: dict[str, float] = {}
    split: dict[str, dict[str, float]] | None = None
    try:
        # The service's own client (its pool and its scripts): the redis-py rows price exactly
        # the Redis call a GetSession makes.
        client = connect_redis(RedisSettings(url=redis_server.url, socket_timeout=10.0))
        store = SessionStore(
            client, key_prefix="bench:", max_ttl_ms=86_400_000, max_sessions_per_user=1_000_000
        )
        context = struct_pb2.Struct()
        context.update(CONTEXT)
        raw = await store.create(OWNER, title="bench", context=context, ttl_ms=3_600_000)
        # Updates rotate over one session per concurrent caller: the bench measures the
        # update path, not writers fighting over a single session.
        raw_ids = [
            (await store.create(OWNER, title="bench", context=context, ttl_ms=3_600_000)).id
            for _ in range(args.concurrency)
        ]
        raw_turn = itertools.cycle(raw_ids)

        async def raw_get() -> object:
            return await store.get(OWNER, raw.id)

        async def raw_update() -> object:
            # The service's merge loop: read, write if unchanged, else read again.
            session_id = next(raw_turn)
            while True:
                current = await store.get(OWNER, session_id)
                try:
                    return await store.set_context(
                        OWNER, session_id, context, expected_version=current.version
                    )
                except VersionConflict:
                    continue

        channel = aio.insecure_channel(f"127.0.0.1:{port}")
        stub = session_pb2_grpc.SessionServiceStub(channel)
        created = await stub.CreateSession(
            pb.CreateSessionRequest(title="bench", context=context), metadata=METADATA
        )
        sid = created.session.id
        get_request = pb.GetSessionRequest(session_id=sid)
        update_requests = itertools.cycle(
            [
                pb.UpdateContextRequest(
                    session_id=(
                        await stub.CreateSession(
                            pb.CreateSessionRequest(title="bench"), metadata=METADATA
                        )
                    ).session.id,
                    context=context,
                )
                for _ in range(args.concurrency)
            ]
        )

        health_stub = health_pb2_grpc.HealthStub(channel)
        health_request = health_pb2.HealthCheckRequest()

        async def grpc_health() -> object:
            return await health_stub.Check(health_request)

        async def grpc_get() -> object:
            return await stub.GetSession(get_request, metadata=METADATA)

        async def grpc_update() -> object:
            return await stub.UpdateContext(next(update_requests), metadata=METADATA)

        print(
            f"session bench: {args.samples} sequential calls for latency, "
            f"{args.seconds:g}s x {args.concurrency} concurrent for throughput"
            f"{'' if pinned else ' (could not pin the service to one core)'}\n"
        )
        print(f"{'operation':<34}{'p50 us':>10}{'p99 us':>10}{'ops/s':>10}{'svc CPU us':>11}")
        for name, call in [
            ("Health.Check  gRPC floor", grpc_health),
            ("GetSession    redis-py direct", raw_get),
            ("GetSession    gRPC service", grpc_get),
            ("UpdateContext redis-py direct", raw_update),
            ("UpdateContext gRPC service", grpc_update),
        ]:
            counted = _Counted(call)
            cpu_before, own_before = cpu_seconds(service.pid), cpu_seconds(os.getpid())
            samples = await latencies(counted, args.samples)
            # The sequential calls alone: what the p50 is made of (the split below).
            sequential = counted.calls
            results[f"{name}:seq cpu"] = (cpu_seconds(service.pid) - cpu_before) / sequential * 1e6
            # The redis-py rows run the service's own store code in this process.
            results[f"{name}:seq own cpu"] = (
                (cpu_seconds(os.getpid()) - own_before) / sequential * 1e6
            )
            rate = await throughput(counted, args.seconds, args.concurrency)
            # Only the gRPC rows cost the service anything; redis-py rows print no CPU.
            cpu = (cpu_seconds(service.pid) - cpu_before) / counted.calls * 1e6
            results[f"{name}:p50"] = pct(samples, 0.50)
            results[f"{name}:p99"] = pct(samples, 0.99)
            results[f"{name}:rate"] = rate
            results[f"{name}:cpu"] = cpu
            print(
                f"{name:<34}{pct(samples, 0.5):>10.0f}{pct(samples, 0.99):>10.0f}{rate:>10.0f}"
                f"{f'{cpu:.0f}' if 'gRPC' in name else '':>11}"
            )
        if args.perf_calls:
            split = await perf_split(
                service.pid,
                workdir,
                args.perf_calls,
                [("health", grpc_health), ("GetSession", grpc_get)],
            )
        await channel.close()
        await client.aclose()
    finally:
        service.stop()
        redis_server.stop()

    get_ratio = (
        results["GetSession    gRPC service:p50"] / results["GetSession    redis-py direct:p50"]
    )
    upd_ratio = (
        results["UpdateContext gRPC service:p50"] / results["UpdateContext redis-py direct:p50"]
    )
    get_rate = results["GetSession    gRPC service:rate"]
    print()
    floor = results["Health.Check  gRPC floor:p50"]
    health_ratio = results["GetSession    gRPC service:p50"] / floor
    cpu_ratio = results["GetSession    gRPC service:cpu"] / results["Health.Check  gRPC floor:cpu"]
    print(f"GetSession p50 ratio gRPC/redis-py:    {get_ratio:.2f}x  (target <= 4x)")
    print(
        f"GetSession p50 vs bare health check:   {health_ratio:.2f}x  (target <= 1.3x: "
        f"{'met' if health_ratio <= 1.3 else 'NOT met'}; "
        f"service CPU per call {cpu_ratio:.2f}x the health check's)"
    )
    print(
        f"  of which the bare gRPC round trip:   {floor:.0f} us "
        f"({floor / results['GetSession    redis-py direct:p50']:.2f}x redis-py alone)"
    )
    print_bounds(results)
    print_split(split)
    print(f"UpdateContext p50 ratio gRPC/redis-py: {upd_ratio:.2f}x")
    print(
        f"GetSession throughput via gRPC:        {get_rate:.0f}/s "
        f"(target >= 3000/s on one core; "
        f"{get_rate / results['GetSession    redis-py direct:rate']:.2f}x of redis-py direct)"
    )
    ok = get_ratio <= 4 and get_rate >= 3000
    print("targets met" if ok else "targets NOT met")
    return 0 if ok else 1


def print_bounds(results: dict[str, float]) -> None:
    """What the GetSession/health p50 ratio is made of, from this run's own counters.

    CPU per call of the sequential (p50) calls only: the service's for the gRPC rows, this
    process's for the redis-py row, which runs the service's own store code and client.
    """
    floor_cpu = results["Health.Check  gRPC floor:seq cpu"]
    get_cpu = results["GetSession    gRPC service:seq cpu"]
    redis_call = results["GetSession    redis-py direct:seq own cpu"]
    rest = get_cpu - floor_cpu - redis_call
    print(
        f"Service CPU per sequential GetSession: {get_cpu:.0f} us = health check {floor_cpu:.0f} "
        f"(gRPC core + interceptor) + {get_cpu - floor_cpu:.0f} more, of which:"
    )
    print(f"  the Redis call (SessionStore.get, priced in this process): {redis_call:.0f} us")
    print(f"  the rest (auth, id check, response build and encode, loop): {rest:.0f} us")
    floor = results["Health.Check  gRPC floor:p50"]
    bound = floor + results["GetSession    redis-py direct:p50"]
    print(
        f"GetSession p50 if it added only its Redis round trip to the health check: "
        f"{bound:.0f} us = {bound / floor:.2f}x the floor "
        f"(leaves {1.3 * floor - bound:.0f} us for everything else within 1.3x)"
    )


# Where a sample's code lives, by shared object (perf's "dso"), in the words of the report.
_PARTS = (
    ("[kernel", "kernel (sockets, epoll, wake-ups)"),
    ("libpython", "Python: our code, asyncio, redis-py"),
    ("cygrpc", "gRPC core + its Cython aio layer"),
    ("loop.cpython", "uvloop"),
    ("_message", "protobuf (upb)"),
    ("hiredis", "hiredis"),
    ("libc", "libc"),
)
_PERF_HZ = 2000


async def perf_split(
    pid: int, workdir: Path, calls: int, rows: list[tuple[str, Callable[[], Awaitable[object]]]]
) -> dict[str, dict[str, float]] | None:
    """The service's CPU per sequential call by shared object, sampled by ``perf``."""
    if shutil.which("perf") is None:
        return None
    split: dict[str, dict[str, float]] = {}
    for name, call in rows:
        data = workdir / f"{name}.perf"
        # posix_spawn, not fork: this process runs gRPC, whose fork handlers complain.
        recorder = spawn("record", "-q", "-F", str(_PERF_HZ), "-p", str(pid), "-o", str(data))
        await asyncio.sleep(0.5)  # perf attached
        for _ in range(calls):
            await call()
        os.kill(recorder, signal.SIGINT)
        await asyncio.to_thread(os.waitpid, recorder, 0)
        text = workdir / f"{name}.txt"
        reporter = spawn(
            "report", "-i", str(data), "--stdio", "--sort", "dso", "-F", "sample,dso", out=text
        )
        await asyncio.to_thread(os.waitpid, reporter, 0)
        report = text.read_text()
        parts: dict[str, float] = {}
        for line in report.splitlines():
            fields = line.split(maxsplit=1)
            if line.startswith("#") or len(fields) != 2 or not fields[0].isdigit():
                continue
            part = next((label for key, label in _PARTS if key in fields[1]), "other")
            parts[part] = parts.get(part, 0.0) + int(fields[0]) / _PERF_HZ / calls * 1e6
        split[name] = parts
    return split


def spawn(*args: str, out: Path | None = None) -> int:
    """``perf`` with ``args``, its output to ``out`` (or nowhere); its pid."""
    target = os.open(out or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        return os.posix_spawnp(
            "perf",
            ["perf", *args],
            os.environ,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, target, 1),
                (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
            ],
        )
    finally:
        os.close(target)


def print_split(split: dict[str, dict[str, float]] | None) -> None:
    if not split:
        print("(no CPU split by component: perf is not installed, or --perf-calls 0)")
        return
    health, get = split["health"], split["GetSession"]
    print(
        "Service CPU per sequential call by component (perf samples; perf's own overhead included):"
    )
    print(f"  {'component':<38}{'health':>8}{'GetSession':>12}{'more':>8}")
    for part in sorted(set(health) | set(get), key=lambda p: -get.get(p, 0.0)):
        h, g = health.get(part, 0.0), get.get(part, 0.0)
        print(f"  {part:<38}{h:>8.0f}{g:>12.0f}{g - h:>8.0f}")
    h_total, g_total = sum(health.values()), sum(get.values())
    print(f"  {'total':<38}{h_total:>8.0f}{g_total:>12.0f}{g_total - h_total:>8.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--perf-calls",
        type=int,
        default=2000,
        help="sequential calls sampled by perf for the CPU split (0: no split)",
    )
    raise SystemExit(uvloop.run(run(parser.parse_args())))


if __name__ == "__main__":
    main()
