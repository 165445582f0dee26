"""ratelimit_svc under a burst: decisions/s and p50/p99 latency of ShouldRateLimit at 50 and
200 concurrent callers, this tree's limiter next to a baseline one, in one run.

Both limiters are real ratelimit_svc processes on one real Redis, started side by side and
measured one after the other (never at once: the machine's cores are shared). The baseline is
another checkout of the repository (``--baseline``, e.g. ``git clone -q . /tmp/rl-base`` at
the commit before the change); without one only this tree is measured. Each request is what
Envoy sends for a session call: two descriptors, the caller's address and its user.
Scenarios: "fresh users" (every decision counts in Redis) and "one user over its limit" (a
burst of one user far past the limit). Envoy's budget is the ratelimit filter's timeout in
envoy/envoy.yaml; the bench prints the ratio new/baseline and whether p99 fits the budget.

    .venv/bin/python bench/ratelimit_bench.py [--baseline /tmp/rl-base] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import uvloop
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from grpc import aio
from measure import percentile

from devtools.servers import ManagedProcess, RedisServer

ROOT = Path(__file__).resolve().parent.parent

CONCURRENCY = (50, 200)
OVER_LIMIT_USER_LIMIT = 100
RULES = (
    '[[rule]]\nname = "per-user"\nkeys = ["user"]\n'
    'requests_per_unit = {user_limit}\nunit = "hour"\n'
    '[[rule]]\nname = "per-address"\nkeys = ["remote_address"]\n'
    'requests_per_unit = 1000000000\nunit = "hour"\n'
)
Results = dict[tuple[str, int], "Result"]


def envoy_budget_ms() -> float:
    """The ratelimit filter's timeout in envoy/envoy.yaml: how long Envoy waits for a decision."""
    config = (Path(__file__).resolve().parent.parent / "envoy" / "envoy.yaml").read_text()
    found = re.search(
        r"envoy\.filters\.http\.ratelimit$.*?timeout: ([0-9.]+)s", config, re.S | re.M
    )
    assert found is not None, "no ratelimit filter timeout in envoy/envoy.yaml"
    return float(found.group(1)) * 1000


@dataclass(frozen=True)
class Result:
    rate: float
    p50_ms: float
    p99_ms: float
    over_limit: int
    cpu_ms: float
    """The limiter process's CPU time per 1000 decisions: what a busy machine skews least."""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def request_for(user: str, domain: str) -> rls_pb2.RateLimitRequest:
    entry = ratelimit_pb2.RateLimitDescriptor.Entry
    return rls_pb2.RateLimitRequest(
        domain=domain,
        descriptors=[
            ratelimit_pb2.RateLimitDescriptor(
                entries=[entry(key="remote_address", value="10.0.0.7")]
            ),
            ratelimit_pb2.RateLimitDescriptor(entries=[entry(key="user", value=user)]),
        ],
    )


async def burst(
    stub: rls_pb2_grpc.RateLimitServiceStub,
    next_request: Callable[[], rls_pb2.RateLimitRequest],
    *,
    seconds: float,
    concurrency: int,
    pid: int,
) -> Result:
    """``concurrency`` callers, each calling again as soon as its answer arrives."""
    samples: list[float] = []
    over = 0
    deadline = time.perf_counter() + seconds

    async def caller() -> None:
        nonlocal over
        while time.perf_counter() < deadline:
            began = time.perf_counter()
            reply = await stub.ShouldRateLimit(next_request())
            samples.append(time.perf_counter() - began)
            over += reply.overall_code == rls_pb2.RateLimitResponse.OVER_LIMIT

    cpu_before, began = cpu_seconds(pid), time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    elapsed, cpu = time.perf_counter() - began, cpu_seconds(pid) - cpu_before
    millis = [sample * 1000 for sample in samples]
    return Result(
        rate=len(samples) / elapsed,
        p50_ms=percentile(millis, 0.5),
        p99_ms=percentile(millis, 0.99),
        over_limit=over,
        cpu_ms=cpu * 1000 / len(samples) * 1000,
    )


def start_limiter(
    name: str, tree: Path, redis_url: str, rules: Path, workdir: Path
) -> ManagedProcess:
    return ManagedProcess(
        name,
        # -P and PYTHONPATH: that tree's packages, not the working directory's.
        [sys.executable, "-P", "-m", "ratelimit_svc"],
        log_path=workdir / f"{name}.log",
        ready=re.compile(r"serving envoy\S* on [0-9.]+:(\d+)"),
        env=dict(
            os.environ,
            PYTHONPATH=str(tree),
            OPSMESH_REDIS_URL=redis_url,
            OPSMESH_GRPC_PORT="0",
            OPSMESH_METRICS_PORT="0",
            OPSMESH_RATELIMIT_RULES=str(rules),
            OPSMESH_LOG_LEVEL="INFO",
        ),
    )


def _fresh_user(users: Iterator[int], domain: str) -> rls_pb2.RateLimitRequest:
    return request_for(f"u{next(users)}", domain)


async def measure(process: ManagedProcess, port: int, label: str, seconds: float) -> Results:
    results: Results = {}
    users = itertools.count()
    async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        await burst(
            stub,
            lambda: request_for(f"warm{next(users)}", label),
            seconds=1.0,
            concurrency=20,
            pid=process.pid,
        )
        for concurrency in CONCURRENCY:
            domain = f"{label}-{concurrency}"
            heavy = request_for("heavy", domain)
            requests: dict[str, Callable[[], rls_pb2.RateLimitRequest]] = {
                "fresh users": functools.partial(_fresh_user, users, domain),
                "one user over its limit": lambda heavy=heavy: heavy,  # type: ignore[misc]
            }
            for scenario, next_request in requests.items():
                results[(scenario, concurrency)] = await burst(
                    stub, next_request, seconds=seconds, concurrency=concurrency, pid=process.pid
                )
    return results


def report(measured: dict[str, Results]) -> None:
    budget = envoy_budget_ms()
    print(
        f"ratelimit bench: ShouldRateLimit, 2 descriptors a request; Envoy budget {budget:g} ms\n"
    )
    print(
        f"{'limiter':<10}{'scenario':<26}{'callers':>8}{'decisions/s':>13}{'p50 ms':>9}"
        f"{'p99 ms':>9}{'CPU ms/1000':>13}{'over':>8}"
    )
    for label, results in measured.items():
        for (scenario, concurrency), result in results.items():
            print(
                f"{label:<10}{scenario:<26}{concurrency:>8}{result.rate:>13.0f}"
                f"{result.p50_ms:>9.2f}{result.p99_ms:>9.2f}{result.cpu_ms:>13.0f}"
                f"{result.over_limit:>8}"
            )
    if "baseline" not in measured:
        return
    print()
    for key, new in measured["new"].items():
        old = measured["baseline"][key]
        print(
            f"{key[0]}, {key[1]} callers: decisions/s x{new.rate / old.rate:.2f}, "
            f"CPU per decision x{new.cpu_ms / old.cpu_ms:.2f}, "
            f"p99 {old.p99_ms:.1f} -> {new.p99_ms:.1f} ms"
        )


async def run(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="ratelimit-bench-"))
    redis = RedisServer(workdir / "redis").start()
    rules = workdir / "rules.toml"
    rules.write_text(RULES.format(user_limit=OVER_LIMIT_USER_LIMIT))
    trees = {"new": ROOT}
    if args.baseline:
        trees["baseline"] = args.baseline.resolve()
    processes = [
        start_limiter(label, tree, redis.url, rules, workdir) for label, tree in trees.items()
    ]
    try:
        # Side by side: both serve the whole time, measured in turn.
        ports = [int(process.start(timeout=60).group(1)) for process in processes]
        measured = {
            process.name: await measure(process, port, process.name, args.seconds)
            for process, port in zip(processes, ports, strict=True)
        }
    finally:
        for process in processes:
            process.stop()
        redis.stop()
    report(measured)
    worst = max(result.p99_ms for result in measured["new"].values())
    return 0 if worst <= envoy_budget_ms() / 2 else 1


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--baseline", type=Path, help="a checkout with the baseline ratelimit_svc")
    parser.add_argument("--seconds", type=float, default=5.0, help="per scenario and concurrency")
    raise SystemExit(uvloop.run(run(parser.parse_args())))


if __name__ == "__main__":
    main()
