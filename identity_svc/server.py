"""Wires the identity service: settings → Redis and key ring → OAuth over HTTP, gRPC server."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace

from identity_svc.accounts import Accounts
from identity_svc.audit import AuditLog
from identity_svc.config import IdentitySettings
from identity_svc.http import IdentityHttp
from identity_svc.invitation_pages import InvitationPages
from identity_svc.invitations import InvitationProblem, Invitations
from identity_svc.keys import KeyRing, LocalKeys
from identity_svc.mail import Mailer, NotifyMailer
from identity_svc.oauth import OAuthServer
from identity_svc.org_service import SERVICE_NAME as ORGANIZATION_SERVICE
from identity_svc.org_service import OrganizationService
from identity_svc.reset import ResetLinks
from identity_svc.reset_pages import PasswordResetPages
from identity_svc.service import SERVICE_NAME, IdentityService
from mesh.auth import Authenticator, authenticator_for
from mesh.health import Probe
from mesh.logs import configure_service_logging
from mesh.redisconn import connect_redis
from mesh.revocations import RevocationFeed
from mesh.server import Registration, RunnerOptions, ServiceRunner, run_main
from mesh.tokens import JwtAuthenticator
from opsmesh.identity.v1 import identity_pb2_grpc, organization_pb2_grpc


def build_runner(
    settings: IdentitySettings,
    *,
    authenticator: Authenticator | None = None,
    options: RunnerOptions | None = None,
    mailer: Mailer | None = None,
) -> ServiceRunner:
    """A ready-to-start server for ``settings`` (tests pass their own authenticator, and a
    mailer that records instead of calling notify_svc)."""
    client = connect_redis(settings.redis)
    ring = KeyRing.load_or_create(settings.issuer.keys_dir)
    accounts = Accounts(client, settings=settings.sign_in)
    oauth = OAuthServer(
        client,
        ring=ring,
        auth=settings.auth,
        access_ttl=settings.issuer.access_token_ttl,
        settings=settings.oauth,
    )
    closers: list[Callable[[], Awaitable[None]]] = []
    if mailer is None:
        notify = NotifyMailer(settings.mail, ring=ring, auth=settings.auth)
        mailer = notify
        closers.append(notify.close)
    # The OAuth endpoints listen where the gRPC server does (one OPSMESH_HOST per process).
    endpoints = replace(settings.issuer, http_host=settings.server.host)
    http = IdentityHttp(endpoints, ring, settings.auth.issuer, oauth=oauth, accounts=accounts)
    audit = AuditLog(client)
    http.add_pages(
        PasswordResetPages(
            issuer=settings.auth.issuer,
            accounts=accounts,
            links=ResetLinks(client, settings=settings.reset),
            oauth=oauth,
            mailer=mailer,
            client_address=http.address_of,
            audit=audit,
            memberships=accounts.memberships,
        )
    )
    invitations = Invitations(
        client,
        accounts=accounts,
        mailer=mailer,
        audit=audit,
        issuer=settings.auth.issuer,
        settings=settings.invitations,
    )
    http.add_pages(
        InvitationPages(
            issuer=settings.auth.issuer,
            accounts=accounts,
            invitations=invitations,
            refused=InvitationProblem,
            client_address=http.address_of,
        )
    )
    # The issuer reads the feed it publishes like any verifier (the schema, not its records).
    revocations = RevocationFeed.open(settings.auth.revocation_feed_url, default=client)
    if authenticator is None and settings.auth.mode == "jwt":
        # The issuer verifies with its own keys, not through its own HTTP endpoint.
        authenticator = JwtAuthenticator(
            keys=LocalKeys(ring),
            issuer=settings.auth.issuer,
            audience=settings.auth.audience,
            revoked=revocations,
        )

    async def redis_answers() -> None:
        await client.ping()

    base = options or RunnerOptions()
    return ServiceRunner(
        settings=settings.server,
        registrations=[
            Registration.of(
                SERVICE_NAME,
                IdentityService(accounts),
                identity_pb2_grpc.add_IdentityServiceServicer_to_server,
            ),
            Registration.of(
                ORGANIZATION_SERVICE,
                OrganizationService(
                    accounts=accounts, invitations=invitations, audit=audit, oauth=oauth
                ),
                organization_pb2_grpc.add_OrganizationServiceServicer_to_server,
            ),
        ],
        authenticator=authenticator or authenticator_for(settings.auth),
        probes=[Probe(name="redis", check=redis_answers)],
        options=base.extended(
            on_start=(http.start,),
            on_stop=(http.stop, *closers, revocations.aclose, client.aclose),
        ),
    )


async def serve(environ: Mapping[str, str]) -> None:
    settings = IdentitySettings.from_env(environ)
    configure_service_logging("identity_svc", settings.server)
    await build_runner(settings).serve_until_signalled()


def main() -> None:
    run_main("identity_svc", serve, IdentitySettings)
