"""Operating the session service: Redis outages, Sentinel, the process, grpcurl, make up."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devtools.servers import ManagedProcess, RedisSentinel, RedisServer, free_port
from devtools.stack import free_ports_environment
from mesh.redisconn import RedisSettings
from opsmesh.session.v1 import session_pb2 as pb
from opsmesh.session.v1 import session_pb2_grpc
from session_svc.server import build_runner
from tests.conftest import FAST_HEALTH, session_settings
from tests.helpers import assert_eventually, error_details, identity
from tests.webclient import ensure_built

ROOT = Path(__file__).resolve().parent.parent


async def test_redis_outage_is_unavailable_and_the_service_recovers_by_itself(
    own_redis: RedisServer,
) -> None:
    runner = build_runner(session_settings(own_redis.url), options=FAST_HEALTH)
    await runner.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel:
            stub = session_pb2_grpc.SessionServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            created = (
                await stub.CreateSession(pb.CreateSessionRequest(), metadata=identity())
            ).session

            own_redis.stop()
            with pytest.raises(aio.AioRpcError) as caught:
                await stub.GetSession(
                    pb.GetSessionRequest(session_id=created.id), metadata=identity()
                )
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "redis is unavailable" in (caught.value.details() or "")
            details = error_details(caught.value)
            assert details["ErrorInfo"].metadata["dependency"] == "redis"
            assert details["RetryInfo"].retry_delay.seconds == 1

            async def not_serving() -> None:
                reply = await health.Check(health_pb2.HealthCheckRequest())
                assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING

            await assert_eventually(not_serving, timeout=5)

            own_redis.start()  # same port, empty: Redis here keeps nothing on disk

            async def recovered() -> None:
                reply = await health.Check(health_pb2.HealthCheckRequest())
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
                await stub.CreateSession(pb.CreateSessionRequest(), metadata=identity())

            await assert_eventually(recovered, timeout=10)
    finally:
        await runner.stop()


async def test_sessions_through_redis_sentinel(own_redis: RedisServer, tmp_path: Path) -> None:
    sentinel = RedisSentinel(tmp_path / "sentinel", master_port=own_redis.port).start()
    try:
        settings = session_settings(own_redis.url)
        settings = type(settings)(
            server=settings.server,
            redis=RedisSettings(
                url="redis://unused:1/0",
                sentinels=(("127.0.0.1", sentinel.port),),
                sentinel_master="mymaster",
            ),
            limits=settings.limits,
            key_prefix=settings.key_prefix,
        )
        runner = build_runner(settings, options=FAST_HEALTH)
        await runner.start()
        try:
            async with aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel:
                stub = session_pb2_grpc.SessionServiceStub(channel)
                created = (
                    await stub.CreateSession(
                        pb.CreateSessionRequest(title="via sentinel"), metadata=identity()
                    )
                ).session
                got = await stub.GetSession(
                    pb.GetSessionRequest(session_id=created.id), metadata=identity()
                )
                assert got.session.title == "via sentinel"
        finally:
            await runner.stop()
    finally:
        sentinel.stop()


def _service_env(redis_url: str, port: int, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OPSMESH_GRPC_PORT=str(port),
        OPSMESH_METRICS_PORT="0",
        OPSMESH_REDIS_URL=redis_url,
        OPSMESH_SESSION_KEY_PREFIX=f"proc:{uuid.uuid4().hex[:8]}:",
        **extra,
    )
    return env


def test_process_serves_then_drains_on_sigterm(redis_server: RedisServer, tmp_path: Path) -> None:
    port = free_port()
    process = ManagedProcess(
        "session_svc",
        [sys.executable, "-m", "session_svc"],
        log_path=tmp_path / "session.log",
        ready=__import__("re").compile(r"serving opsmesh\.session\.v1\.SessionService"),
        env=_service_env(redis_server.url, port),
    )
    process.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = session_pb2_grpc.SessionServiceStub(channel)
            created = stub.CreateSession(pb.CreateSessionRequest(), metadata=identity()).session
            assert (
                stub.GetSession(
                    pb.GetSessionRequest(session_id=created.id), metadata=identity()
                ).session.id
                == created.id
            )
    finally:
        assert process.process is not None
        process.process.send_signal(signal.SIGTERM)
        assert process.process.wait(15) == 0
    lines = [json.loads(line) for line in process.log_path.read_text().splitlines() if line]
    messages = [entry["message"] for entry in lines]
    assert any(m.startswith("draining") for m in messages), messages
    assert messages[-1] == "stopped"
    assert all(entry["service"] == "session_svc" for entry in lines)


def test_bad_configuration_fails_fast_with_every_problem_named() -> None:
    env = dict(os.environ)
    env.update(
        OPSMESH_GRPC_PORT="eighty",
        OPSMESH_SESSION_TTL="forever",
        OPSMESH_REDIS_URL="http://nope",
        OPSMESH_LOG_LEVEL="LOUD",
    )
    result = subprocess.run(
        [sys.executable, "-m", "session_svc"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    for name in (
        "OPSMESH_GRPC_PORT",
        "OPSMESH_SESSION_TTL",
        "OPSMESH_REDIS_URL",
        "OPSMESH_LOG_LEVEL",
    ):
        assert name in result.stderr
    assert "Traceback" not in result.stderr


GRPCURL = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")


@pytest.mark.skipif(not Path(GRPCURL).exists(), reason="grpcurl is not installed (make install)")
def test_make_up_then_grpcurl_lists_creates_reads_updates_lists_and_expires(
    tmp_path: Path,
) -> None:
    """The issue's 'done when', end to end through the dev stack and real grpcurl."""
    ensure_built()  # the stack serves the web client too
    # Port 9 (discard): nothing answers there, as on a laptop without Ollama.
    env = dict(
        os.environ,
        OPSMESH_RUN_DIR=str(tmp_path / "run"),
        OLLAMA_HOST="http://127.0.0.1:9",
        OPSMESH_OLLAMA_RETRIES="0",
    )
    env.update(free_ports_environment())

    def port(name: str) -> str:
        return env[f"OPSMESH_DEV_{name}_PORT"]

    def stack(command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "devtools.stack", command],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    address = f"localhost:{port('SESSION')}"
    # Every service verifies tokens itself (as in Kubernetes): calls carry an operator's token.
    bearer: list[str] = []
    spoofed = ("x-opsmesh-user-id: dev", "x-opsmesh-org-id: devorg", "x-opsmesh-roles: admin")

    def grpcurl(
        *args: str,
        data: dict[str, object] | None = None,
        at: str = address,
        headers: Sequence[str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        flags = [
            flag for header in (bearer if headers is None else headers) for flag in ("-H", header)
        ]
        body = ["-d", json.dumps(data)] if data is not None else []
        return subprocess.run(
            [GRPCURL, "-plaintext", *flags, *body, at, *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    assert stack("status").returncode == 1
    up = stack("up")
    assert up.returncode == 0, up.stderr + up.stdout
    try:
        assert "SERVING" in up.stdout
        password = (tmp_path / "run" / "dev-credentials").read_text().strip()
        edge = f"http://localhost:{port('EDGE')}"
        assert f"open {edge} and sign in as dev / {password} (org dev)" in up.stdout
        assert "already up" in stack("up").stdout
        assert stack("status").returncode == 0
        token = subprocess.run(
            [
                sys.executable,
                "-m",
                "identity_svc.tokens",
                "issue",
                "--user",
                "dev",
                "--org",
                "devorg",
                # Invitations are for org admins (and services) to send (docs/notifications.md).
                "--roles",
                "admin",
            ],
            env={
                **env,
                "OPSMESH_JWT_KEYS_DIR": str(tmp_path / "run" / "keys"),
                "OPSMESH_JWT_ISSUER": f"http://localhost:{port('EDGE')}",
            },
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
            cwd=ROOT,
        ).stdout.strip()
        bearer.append(f"authorization: Bearer {token}")

        listed = grpcurl("list")
        assert listed.returncode == 0, listed.stderr
        assert {"opsmesh.session.v1.SessionService", "grpc.health.v1.Health"} <= set(
            listed.stdout.split()
        )
        health = grpcurl("grpc.health.v1.Health/Check")
        assert json.loads(health.stdout)["status"] == "SERVING"

        created = grpcurl(
            "opsmesh.session.v1.SessionService/CreateSession",
            data={"title": "from grpcurl", "context": {"env": "dev"}},
        )
        assert created.returncode == 0, created.stderr
        session = json.loads(created.stdout)["session"]
        sid = session["id"]
        got = json.loads(
            grpcurl("opsmesh.session.v1.SessionService/GetSession", data={"sessionId": sid}).stdout
        )
        assert got["session"]["context"] == {"env": "dev"}
        updated = grpcurl(
            "opsmesh.session.v1.SessionService/UpdateContext",
            data={"sessionId": sid, "context": {"step": 2}, "expectedVersion": "1"},
        )
        assert json.loads(updated.stdout)["session"]["version"] == "2"
        stale = grpcurl(
            "opsmesh.session.v1.SessionService/UpdateContext",
            data={"sessionId": sid, "context": {"step": 3}, "expectedVersion": "1"},
        )
        assert stale.returncode != 0
        assert "Aborted" in stale.stderr
        listing = json.loads(
            grpcurl("opsmesh.session.v1.SessionService/ListSessions", data={}).stdout
        )
        assert [s["id"] for s in listing["sessions"]] == [sid]
        assert (
            grpcurl(
                "opsmesh.session.v1.SessionService/ExpireSession", data={"sessionId": sid}
            ).returncode
            == 0
        )
        gone = grpcurl("opsmesh.session.v1.SessionService/GetSession", data={"sessionId": sid})
        assert "NotFound" in gone.stderr

        # Chat verifies tokens itself: identity headers from a process that skips the edge
        # are refused; with a token it runs, and with no Ollama it says exactly what is missing.
        chat = f"localhost:{port('CHAT')}"
        claimed = grpcurl(
            "opsmesh.chat.v1.ChatService/StreamChat",
            data={"sessionId": sid, "message": "hello"},
            at=chat,
            headers=spoofed,
        )
        assert "Unauthenticated" in claimed.stderr, claimed.stderr
        answer = grpcurl(
            "opsmesh.chat.v1.ChatService/StreamChat",
            data={"sessionId": sid, "message": "hello"},
            at=chat,
            headers=bearer,
        )
        assert "NotFound" in answer.stderr, answer.stderr  # the session was expired above
        live = json.loads(
            grpcurl("opsmesh.session.v1.SessionService/CreateSession", data={}).stdout
        )
        answer = grpcurl(
            "opsmesh.chat.v1.ChatService/StreamChat",
            data={"sessionId": live["session"]["id"], "message": "hello"},
            at=chat,
            headers=bearer,
        )
        assert "Unavailable" in answer.stderr, answer.stderr
        assert "the model server at http://127.0.0.1:9 is unreachable" in answer.stderr

        # The task service and a worker run too: a published task's transitions stream live.
        tasks = f"localhost:{port('TASK')}"
        published = grpcurl(
            "opsmesh.task.v1.TaskService/PublishWorkspaceTask",
            data={
                "payload": {"action": "WORKSPACE_ACTION_PROVISION", "workspace": "team-a"},
                "idempotencyKey": "make-up-test",
            },
            at=tasks,
        )
        assert published.returncode == 0, published.stderr
        task_id = json.loads(published.stdout)["task"]["id"]
        watched = grpcurl(
            "opsmesh.task.v1.TaskService/WatchTask", data={"taskId": task_id}, at=tasks
        )
        assert watched.returncode == 0, watched.stderr
        updates = [
            json.loads(chunk) for chunk in re.split(r"(?<=\})\n(?=\{)", watched.stdout.strip())
        ]
        statuses = [u["task"]["status"] for u in updates]
        assert statuses[-1] == "TASK_STATUS_FAILED", statuses
        assert "no Kubernetes cluster is configured" in updates[-1]["task"]["error"]

        # Through the Envoy edge: a token from the operator command, verified by Envoy.
        edge = f"localhost:{port('EDGE')}"
        list_sessions = "opsmesh.session.v1.SessionService/ListSessions"
        through = grpcurl(
            list_sessions,
            data={},
            at=edge,
            headers=bearer,
        )
        assert through.returncode == 0, through.stderr
        # Reflection through the edge: every public service, and each one's health by name.
        listed = grpcurl("list", at=edge, headers=bearer)
        assert listed.returncode == 0, listed.stderr
        assert {
            "opsmesh.session.v1.SessionService",
            "opsmesh.chat.v1.ChatService",
            "opsmesh.task.v1.TaskService",
            "opsmesh.notify.v1.NotificationService",
        } <= set(listed.stdout.split())
        chat_health = grpcurl(
            "grpc.health.v1.Health/Check",
            data={"service": "opsmesh.chat.v1.ChatService"},
            at=edge,
            headers=bearer,
        )
        assert json.loads(chat_health.stdout) == {"status": "SERVING"}, chat_health.stderr
        refused = grpcurl(list_sessions, data={}, at=edge, headers=[])
        assert "Unauthenticated" in refused.stderr

        # An invitation sent with grpcurl lands in the dev mail sink with both parts.
        invited = grpcurl(
            "opsmesh.notify.v1.NotificationService/SendEmail",
            data={
                "template": "org_invitation",
                "data": {
                    "org_name": "Acme",
                    "inviter_name": "Ada",
                    "accept_url": "https://opsmesh.example/join/1",
                },
                "to": [{"address": "bob@example.com", "name": "Bob"}],
                "idempotencyKey": "make-up-invite",
            },
            at=f"localhost:{port('NOTIFY')}",  # the token's role admin may send invitations
        )
        assert invited.returncode == 0, invited.stderr

        def mail(*args: str) -> str:
            return subprocess.run(
                [sys.executable, "-m", "devtools.mailsink", *args, str(tmp_path / "run" / "mail")],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
                cwd=ROOT,
            ).stdout

        deadline = time.monotonic() + 20
        while "1 message(s)" not in mail("list") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "Ada invited you to Acme on opsmesh" in mail("list")
        shown = subprocess.run(
            [
                sys.executable,
                "-m",
                "devtools.mailsink",
                "show",
                str(tmp_path / "run" / "mail"),
                "1",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
            cwd=ROOT,
        ).stdout
        assert "Content-Type: text/plain" in shown
        assert "Content-Type: text/html" in shown
    finally:
        down = stack("down")
    assert down.returncode == 0
    assert "stopped session_svc" in down.stdout
    assert "stopped task_worker" in down.stdout
    assert stack("status").returncode == 1
    assert "not running" in stack("down").stdout


def test_make_up_reports_a_taken_port(tmp_path: Path, redis_server: RedisServer) -> None:
    # Every other port free, so the one taken port is the only complaint wherever this runs.
    env = dict(os.environ, OPSMESH_RUN_DIR=str(tmp_path / "run"))
    env.update(free_ports_environment())
    env["OPSMESH_DEV_REDIS_PORT"] = str(redis_server.port)
    result = subprocess.run(
        [sys.executable, "-m", "devtools.stack", "up"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert f"redis port {redis_server.port} already in use" in result.stderr
