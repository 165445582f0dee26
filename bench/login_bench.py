"""Sign-in under attack and under load (issue #13 items 1, 5, 6), this tree beside a baseline.

Each run starts the service that checks passwords (``python -m identity_svc``; in a tree
from before the identity split, ``python -m session_svc``) from a source tree (this one; with
``--before`` also a pristine clone, e.g. ``git clone -q /work/main /tmp/base && git -C /tmp/base
checkout -q 4408011``) on a fresh Redis and measures, talking to it directly as the edge
would (X-Forwarded-For from 127.0.0.1, which is a trusted proxy):

* an RPC of that same process (GetCurrentUser; ListSessions before the split) p50/p99, idle
  and while 8 sign-ins run all the time, and the ratio to idle (argon2 on the event loop
  stalls every RPC behind it);
* lockout: after failed sign-ins of made-up users from one client, does the right password
  from another client get 429?
* passwords checked when 50 wrong guesses for one user arrive at once (the limit is 5);
* refresh replays: after a legitimate refresh, the spent token is replayed 6 times at
  ``--replay-interval`` (inside the 2 s grace); how many got tokens?

    .venv/bin/python bench/login_bench.py [--before /tmp/base] [--logins 8] [--samples 200]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import hashlib
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis.asyncio as aioredis
from grpc import aio
from measure import percentile

from devtools.servers import RedisServer, free_port
from mesh.auth import ORG_HEADER, USER_HEADER
from opsmesh.identity.v1 import identity_pb2, identity_pb2_grpc
from opsmesh.session.v1 import session_pb2 as pb
from opsmesh.session.v1 import session_pb2_grpc

HERE = Path(__file__).resolve().parent.parent
CLIENT = "opsmesh-web"
REDIRECT = "http://localhost:5173/oauth/callback"
PASSWORD = "bench-password-0123"  # noqa: S105 - the bench's own throwaway user
VERIFIER = secrets.token_urlsafe(48)
CHALLENGE = (
    base64.urlsafe_b64encode(hashlib.sha256(VERIFIER.encode()).digest()).decode().rstrip("=")
)
METADATA = ((USER_HEADER, "ada"), (ORG_HEADER, "bench"))


@dataclass
class Service:
    http: httpx.AsyncClient
    call: Callable[[], Awaitable[object]]
    """One unary RPC of the process that checks passwords."""
    redis: aioredis.Redis


@dataclass
class Figures:
    idle_p50: float
    idle_p99: float
    busy_p50: float
    busy_p99: float
    busy_failed: int
    locked_out_others: bool
    checked_of_50: int
    replays_accepted: int


@dataclass
class Processes:
    redis: RedisServer
    service: subprocess.Popen[bytes]
    grpc_port: int
    http_port: int
    split: bool
    """Does the tree have identity_svc (else the session service checks passwords)?"""


def start_processes(repo: Path, workdir: Path) -> Processes:
    """Redis, the users ada and bob, and the identity service of ``repo`` (its own cwd)."""
    redis_server = RedisServer(workdir / "redis").start()
    grpc_port, http_port = free_port(), free_port()
    env = dict(
        os.environ,
        OPSMESH_GRPC_PORT=str(grpc_port),
        OPSMESH_METRICS_PORT="0",
        OPSMESH_IDENTITY_HTTP_PORT=str(http_port),
        OPSMESH_SESSION_HTTP_PORT=str(http_port),  # the name before the identity split
        OPSMESH_JWT_KEYS_DIR=str(workdir / "keys"),
        OPSMESH_JWT_ISSUER=f"http://127.0.0.1:{http_port}",
        OPSMESH_OAUTH_CLIENTS=f"{CLIENT}={REDIRECT}",
        OPSMESH_REDIS_URL=redis_server.url,
        OPSMESH_TRUSTED_PROXIES="127.0.0.1",
        OPSMESH_LOG_LEVEL="WARNING",
    )
    split = (repo / "identity_svc").is_dir()
    module = "identity_svc" if split else "session_svc"
    create = [sys.executable, "-m", f"{module}.accounts", "create", "--org", "bench"]
    for user in ("ada", "bob"):
        subprocess.run(
            [*create, "--user", user, "--password-stdin"],
            input=PASSWORD + "\n",
            text=True,
            cwd=repo,
            env=env,
            check=True,
            capture_output=True,
        )
    with (workdir / f"{module}.log").open("wb") as log:
        service = subprocess.Popen(
            [sys.executable, "-m", module], cwd=repo, env=env, stdout=log, stderr=log
        )
    return Processes(redis_server, service, grpc_port, http_port, split)


def stop_processes(processes: Processes) -> None:
    processes.service.terminate()
    processes.service.wait(timeout=30)
    processes.redis.stop()


@asynccontextmanager
async def identity_service(repo: Path, workdir: Path) -> AsyncIterator[Service]:
    processes = await asyncio.to_thread(start_processes, repo, workdir)
    try:
        async with (
            httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{processes.http_port}", timeout=60
            ) as http,
            aio.insecure_channel(f"127.0.0.1:{processes.grpc_port}") as channel,
        ):
            await _ready(http)
            client = aioredis.Redis.from_url(processes.redis.url)
            call: Callable[[], Awaitable[object]]
            if processes.split:
                identity = identity_pb2_grpc.IdentityServiceStub(channel)
                call = functools.partial(
                    identity.GetCurrentUser,
                    identity_pb2.GetCurrentUserRequest(),
                    metadata=METADATA,
                )
            else:
                sessions = session_pb2_grpc.SessionServiceStub(channel)
                call = functools.partial(
                    sessions.ListSessions, pb.ListSessionsRequest(), metadata=METADATA
                )
            yield Service(http, call, client)
            await client.aclose()
    finally:
        await asyncio.to_thread(stop_processes, processes)


async def _ready(http: httpx.AsyncClient) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if (await http.get("/.well-known/openid-configuration")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError("the identity service did not come up")


async def sign_in(
    service: Service, user: str, password: str, address: str, scope: str = "openid"
) -> httpx.Response:
    """The browser's sign-in: the login page, then its form posted back."""
    query = {
        "response_type": "code",
        "client_id": CLIENT,
        "redirect_uri": REDIRECT,
        "scope": scope,
        "code_challenge": CHALLENGE,
        "code_challenge_method": "S256",
    }
    async with httpx.AsyncClient(base_url=service.http.base_url, timeout=60) as browser:
        page = await browser.get("/oauth/authorize", params=query)
        form = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', page.text))
        return await browser.post(
            "/oauth/authorize",
            data={**form, "username": user, "password": password},
            headers={"X-Forwarded-For": address},
        )


@dataclass
class Latencies:
    seconds: list[float]
    failed: int
    """Calls that failed (a stalled loop makes the service's own Redis calls time out)."""


async def list_latencies(service: Service, samples: int) -> Latencies:
    found = Latencies([], 0)
    for _ in range(samples):
        began = time.perf_counter()
        try:
            await service.call()
        except aio.AioRpcError:
            found.failed += 1
        found.seconds.append(time.perf_counter() - began)
    return found


async def latency_under_logins(service: Service, samples: int, logins: int) -> Latencies:
    stop = asyncio.Event()

    async def keep_signing_in(n: int) -> None:
        while not stop.is_set():
            await sign_in(service, "ada", PASSWORD, f"198.51.100.{n}")

    workers = [asyncio.create_task(keep_signing_in(n)) for n in range(logins)]
    await asyncio.sleep(1.0)  # every worker inside a password check
    try:
        return await list_latencies(service, samples)
    finally:
        stop.set()
        await asyncio.gather(*workers)


async def lockout(service: Service) -> bool:
    for _ in range(6):
        await sign_in(service, f"nobody{secrets.token_hex(3)}", "guess", "203.0.113.66")
    return (await sign_in(service, "bob", PASSWORD, "198.51.100.200")).status_code == 429


async def checked_of_parallel_guesses(service: Service, guesses: int) -> int:
    answers = await asyncio.gather(
        *(sign_in(service, "bob", f"guess{n}", "203.0.113.77") for n in range(guesses))
    )
    return sum(answer.status_code == 401 for answer in answers)


async def replays_accepted(service: Service, replays: int, interval: float) -> int:
    signed_in = await sign_in(service, "ada", PASSWORD, "198.51.100.250", "offline_access")
    code = re.search(r"code=([^&]+)", signed_in.headers["location"])
    assert code is not None
    tokens = await service.http.post(
        "/oauth/token",
        data={
            "grant_type": "authorization_code",
            "code": code.group(1),
            "client_id": CLIENT,
            "redirect_uri": REDIRECT,
            "code_verifier": VERIFIER,
        },
    )
    refresh = {"grant_type": "refresh_token", "client_id": CLIENT}
    spent = tokens.json()["refresh_token"]
    await service.http.post("/oauth/token", data={**refresh, "refresh_token": spent})
    accepted = 0
    for _ in range(replays):
        await asyncio.sleep(interval)
        answer = await service.http.post("/oauth/token", data={**refresh, "refresh_token": spent})
        accepted += answer.status_code == 200
    return accepted


async def forget_failures(service: Service) -> None:
    async for key in service.redis.scan_iter(match="opsmesh:id:fail:*"):
        await service.redis.delete(key)


async def measure(repo: Path, args: argparse.Namespace) -> Figures:
    with tempfile.TemporaryDirectory(prefix="login-bench-") as workdir:
        async with identity_service(repo, Path(workdir)) as service:
            await list_latencies(service, 50)  # warm-up
            idle = await list_latencies(service, args.samples)
            busy = await latency_under_logins(service, args.samples, args.logins)
            # Each phase on clean counters (before: every failure counted on one address).
            await forget_failures(service)
            locked = await lockout(service)
            await forget_failures(service)
            checked = await checked_of_parallel_guesses(service, 50)
            await forget_failures(service)
            replays = await replays_accepted(service, 6, args.replay_interval)
    return Figures(
        idle_p50=percentile(idle.seconds, 0.5) * 1e3,
        idle_p99=percentile(idle.seconds, 0.99) * 1e3,
        busy_p50=percentile(busy.seconds, 0.5) * 1e3,
        busy_p99=percentile(busy.seconds, 0.99) * 1e3,
        busy_failed=busy.failed,
        locked_out_others=locked,
        checked_of_50=checked,
        replays_accepted=replays,
    )


def report(name: str, figures: Figures, logins: int) -> None:
    busy_p50 = figures.busy_p50 / figures.idle_p50
    busy_p99 = figures.busy_p99 / figures.idle_p99
    locked = "yes" if figures.locked_out_others else "no"
    print(f"{name}:")
    print(f"  one RPC idle:       p50 {figures.idle_p50:8.2f} ms  p99 {figures.idle_p99:8.2f} ms")
    print(
        f"  with {logins} logins:    p50 {figures.busy_p50:8.2f} ms  p99 {figures.busy_p99:8.2f} ms"
        f"  (x{busy_p50:.1f} / x{busy_p99:.1f} of idle), {figures.busy_failed} failed"
    )
    print(f"  other users locked out by one client's failures: {locked}")
    print(f"  passwords checked of 50 parallel guesses (limit 5): {figures.checked_of_50}")
    print(f"  spent refresh token replays accepted: {figures.replays_accepted} of 6")


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", type=Path, help="a pristine clone to compare with")
    parser.add_argument("--logins", type=int, default=8)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--replay-interval", type=float, default=1.5)
    args = parser.parse_args()
    after = await measure(HERE, args)
    report(f"this tree ({HERE})", after, args.logins)
    if args.before is not None:
        before = await measure(args.before.resolve(), args)
        report(f"before ({args.before})", before, args.logins)
        print(
            "busy/idle p50 ratio, before -> after: "
            f"x{before.busy_p50 / before.idle_p50:.1f} -> x{after.busy_p50 / after.idle_p50:.1f}"
            f"; p99: x{before.busy_p99 / before.idle_p99:.1f}"
            f" -> x{after.busy_p99 / after.idle_p99:.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
