"""Wires the session service: settings → Redis → store → gRPC server."""

from __future__ import annotations

from collections.abc import Mapping

from mesh.auth import Authenticator, authenticator_for
from mesh.health import Probe
from mesh.logs import configure_service_logging
from mesh.redisconn import connect_redis
from mesh.revocations import RevocationFeed
from mesh.server import Registration, RunnerOptions, ServiceRunner, run_main
from opsmesh.session.v1 import session_pb2_grpc
from session_svc.config import SessionSettings
from session_svc.service import SERVICE_NAME, SessionService
from session_svc.store import SessionStore


def build_runner(
    settings: SessionSettings,
    *,
    authenticator: Authenticator | None = None,
    options: RunnerOptions | None = None,
) -> ServiceRunner:
    """A ready-to-start server for ``settings`` (tests pass their own authenticator)."""
    client = connect_redis(settings.redis)
    store = SessionStore(
        client,
        key_prefix=settings.key_prefix,
        max_ttl_ms=int(settings.limits.max_ttl * 1000),
        max_sessions_per_user=settings.limits.max_sessions_per_user,
    )
    service = SessionService(store, settings.limits)
    revocations = RevocationFeed.open(settings.auth.revocation_feed_url, default=client)
    base = options or RunnerOptions()
    return ServiceRunner(
        settings=settings.server,
        registrations=[
            Registration.of(
                SERVICE_NAME, service, session_pb2_grpc.add_SessionServiceServicer_to_server
            )
        ],
        authenticator=authenticator or authenticator_for(settings.auth, revocations=revocations),
        probes=[Probe(name="redis", check=store.ping)],
        options=base.extended(on_stop=(revocations.aclose, client.aclose)),
    )


async def serve(environ: Mapping[str, str]) -> None:
    settings = SessionSettings.from_env(environ)
    configure_service_logging("session_svc", settings.server)
    await build_runner(settings).serve_until_signalled()


def main() -> None:
    run_main("session_svc", serve, SessionSettings)
