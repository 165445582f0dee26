"""Fixtures: real redis-server and nats-server on ephemeral ports, the session service, and
settings for an identity service (the token issuer)."""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from grpc import aio

from devtools.servers import NatsServer, RedisServer
from identity_svc.config import IdentitySettings
from identity_svc.http import IssuerSettings
from identity_svc.oauth import OAuthSettings
from mesh import errors
from mesh.auth import AuthSettings
from mesh.redisconn import RedisSettings
from mesh.server import RunnerOptions, ServiceRunner
from mesh.settings import ServerSettings
from opsmesh.session.v1 import session_pb2_grpc
from session_svc.config import SessionLimits, SessionSettings
from session_svc.server import build_runner

# A server answering with an error reason the contract (errors.proto) does not declare fails the
# test instead of falling back, here and in the services the tests start as processes.
os.environ["OPSMESH_STRICT_ERROR_REASONS"] = "1"
errors.STRICT_REASONS = True


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path_factory.mktemp("nats")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def history_dsn(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The one chDB path of this process (chDB runs one engine, on one path, per process)."""
    return f"chdb://{tmp_path_factory.mktemp('chdb')}/history"


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own, for tests that stop and restart it."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


TEST_LIMITS = SessionLimits(
    default_ttl=600.0, min_ttl=1.0, max_ttl=3600.0, max_context_bytes=4096,
    max_sessions_per_user=25,
)  # fmt: skip


def session_settings(redis_url: str, **limits: float) -> SessionSettings:
    """Settings for a session service on an ephemeral port with its own key prefix."""
    return SessionSettings(
        server=ServerSettings(port=0, grace_period=2.0),
        redis=RedisSettings(url=redis_url, socket_timeout=0.5, connect_timeout=0.5),
        limits=replace(TEST_LIMITS, **limits),  # type: ignore[arg-type]
        key_prefix=f"test:{uuid.uuid4().hex[:8]}:",
    )


WEB_CLIENTS = {
    "opsmesh-web": ("http://localhost:8080/oauth/callback", "http://localhost:5173/oauth/callback")
}
"""The web client as the dev stack registers it (a deployment names its own redirect URIs)."""


def identity_settings(
    redis_url: str,
    *,
    keys_dir: Path | None = None,
    http_port: int = 0,
    access_token_ttl: float = 900.0,
    oauth: OAuthSettings | None = None,
) -> IdentitySettings:
    """Settings for an identity service (JWT mode) on ephemeral gRPC and ``http_port``
    (0: no OAuth endpoints), issuing as ``http://127.0.0.1:<http_port>``."""
    return IdentitySettings(
        server=ServerSettings(port=0, grace_period=2.0),
        redis=RedisSettings(url=redis_url, socket_timeout=0.5, connect_timeout=0.5),
        auth=AuthSettings(mode="jwt", issuer=f"http://127.0.0.1:{http_port}", audience="opsmesh"),
        issuer=IssuerSettings(
            keys_dir=keys_dir or Path(tempfile.mkdtemp(prefix="keys-")),
            http_port=http_port,
            access_token_ttl=access_token_ttl,
        ),
        oauth=oauth or OAuthSettings(clients=WEB_CLIENTS),
    )


FAST_HEALTH = RunnerOptions(health_interval=0.1, health_timeout=0.5)


@pytest.fixture
async def session_runner(redis_server: RedisServer) -> AsyncIterator[ServiceRunner]:
    runner = build_runner(session_settings(redis_server.url), options=FAST_HEALTH)
    await runner.start()
    yield runner
    await runner.stop()


@pytest.fixture
async def channel(session_runner: ServiceRunner) -> AsyncIterator[aio.Channel]:
    async with aio.insecure_channel(f"127.0.0.1:{session_runner.port}") as chan:
        yield chan


@pytest.fixture
def sessions(channel: aio.Channel) -> session_pb2_grpc.SessionServiceStub:
    return session_pb2_grpc.SessionServiceStub(channel)


def code_of(error: BaseException) -> grpc.StatusCode:
    assert isinstance(error, aio.AioRpcError), error
    return error.code()
