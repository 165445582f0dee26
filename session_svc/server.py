"""Wires the session service: settings → Redis → store → gRPC server."""

from __future__ import annotations

from collections.abc import Mapping

from mesh.auth import Authenticator, authenticator_for
from mesh.health import Probe
from mesh.logs import configure_service_logging
from mesh.redisconn import connect_redis
from mesh.server import Registration, RunnerOptions, ServiceRunner, run_main
from mesh.tokens import JwtAuthenticator, KeyRing, LocalKeys, RedisRevocations
from opsmesh.session.v1 import session_pb2_grpc
from session_svc.accounts import Accounts
from session_svc.config import SessionSettings
from session_svc.identity import IdentityHttp
from session_svc.oauth import OAuthServer
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
    ring = KeyRing.load_or_create(settings.issuer.keys_dir)
    accounts = Accounts(client, settings=settings.sign_in)
    oauth = OAuthServer(
        client,
        ring=ring,
        auth=settings.auth,
        access_ttl=settings.issuer.access_token_ttl,
        settings=settings.oauth,
    )
    identity = IdentityHttp(
        settings.issuer, ring, settings.auth.issuer, oauth=oauth, accounts=accounts
    )
    if authenticator is None and settings.auth.mode == "jwt":
        # The issuer verifies with its own keys, not through its own HTTP endpoint.
        authenticator = JwtAuthenticator(
            keys=LocalKeys(ring),
            issuer=settings.auth.issuer,
            audience=settings.auth.audience,
            revoked=RedisRevocations(client),
        )
    base = options or RunnerOptions()
    return ServiceRunner(
        settings=settings.server,
        registrations=[
            Registration.of(
                SERVICE_NAME, service, session_pb2_grpc.add_SessionServiceServicer_to_server
            )
        ],
        authenticator=authenticator or authenticator_for(settings.auth),
        probes=[Probe(name="redis", check=store.ping)],
        options=base.extended(on_start=(identity.start,), on_stop=(identity.stop, client.aclose)),
    )


async def serve(environ: Mapping[str, str]) -> None:
    settings = SessionSettings.from_env(environ)
    configure_service_logging("session_svc", settings.server)
    await build_runner(settings).serve_until_signalled()


def main() -> None:
    run_main("session_svc", serve)
