"""Issue #17, organizations: members, roles and invitations through the real Envoy edge in
front of the identity service, with a session service verifying tokens like every service.

The invitation emails are what identity hands to its mailer (notify_svc's SendEmail in the
stack, tests/test_stack_trust.py follows one into the mail sink); the mailer here records
them, so that a test can follow the link like the invitee would.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import grpc
import httpx
import pytest
import redis.asyncio as aioredis
from grpc import aio

from devtools.edge import EdgeTopology, envoy_process, free_edge_ports, render
from devtools.servers import RedisServer
from identity_svc.accounts import Accounts
from identity_svc.audit import AuditLog
from identity_svc.config import IdentitySettings
from identity_svc.invitations import Invitations
from identity_svc.server import build_runner as build_identity
from mesh.redisconn import RedisSettings, connect_redis
from mesh.server import ServiceRunner
from opsmesh.identity.v1 import organization_pb2 as pb
from opsmesh.identity.v1 import organization_pb2_grpc
from opsmesh.session.v1 import session_pb2_grpc
from tests.helpers import redeem_code, refresh_grant, status_with_token, wait_envoy_live
from tests.test_identity_attacks import (
    CLIENT,
    PASSWORD,
    REDIRECT,
    login_form,
    pkce,
    sign_in,
    some_address,
    stack_environment,
    start_verifying_session,
)
from tests.test_password_reset import HIDDEN, on_edge

NEW_PASSWORD = "a sentence nobody guesses"


@dataclass(frozen=True, kw_only=True)
class SentEmail:
    template: str
    to: str
    org_id: str
    data: Mapping[str, Any]


@dataclass
class Mailer:
    """Stands in for notify_svc: keeps what identity asked to send; ``down`` fails like an
    unreachable notify_svc."""

    sent: list[SentEmail] = field(default_factory=list)
    down: bool = False

    async def send_email(
        self, *, template: str, to: str, org_id: str, data: Mapping[str, Any]
    ) -> None:
        if self.down:
            raise aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE, aio.Metadata(), aio.Metadata(), "notify is down", None
            )
        self.sent.append(SentEmail(template=template, to=to, org_id=org_id, data=dict(data)))

    def link_to(self, address: str) -> str:
        mails = [m for m in self.sent if m.to == address and m.template == "org_invitation"]
        assert mails, f"no invitation to {address}"
        return str(mails[-1].data["accept_url"])


@dataclass
class Stack:
    edge: httpx.AsyncClient
    issuer: str
    orgs: organization_pb2_grpc.OrganizationServiceAsyncStub
    sessions: session_pb2_grpc.SessionServiceStub
    redis: aioredis.Redis
    accounts: Accounts
    mailer: Mailer
    org: str
    admin: str

    async def tokens(self, user: str, password: str = PASSWORD) -> dict[str, str]:
        """A browser sign-in through the edge (code + PKCE) and the code's tokens."""
        verifier, challenge = pkce()
        form = await login_form(self.edge, challenge)
        signed_in = await sign_in(self.edge, user, password, some_address(), form=form)
        assert signed_in.status_code == 302, signed_in.text
        code = parse_qs(urlsplit(signed_in.headers["location"]).query)["code"][0]
        response = await redeem_code(
            self.edge, code=code, verifier=verifier, client_id=CLIENT, redirect_uri=REDIRECT
        )
        assert response.status_code == 200, response.text
        tokens: dict[str, str] = response.json()
        return tokens

    async def user(self, *, roles: str = "member", email: str = "", org: str = "") -> str:
        """A new account, member of ``org`` (the stack's org by default)."""
        name = f"u{secrets.token_hex(4)}"
        await self.accounts.create(
            org_id=org or self.org, user_id=name, password=PASSWORD, roles=roles, email=email
        )
        return name


def claims(token: str) -> dict[str, Any]:
    """An access token's claims (read, not verified: the services verify)."""
    payload = token.split(".")[1]
    decoded: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return decoded


def bearer(tokens: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {tokens['access_token']}"),)


async def refused(call: Any, request: Any, tokens: Mapping[str, str]) -> grpc.StatusCode:
    with pytest.raises(aio.AioRpcError) as error:
        await call(request, metadata=bearer(tokens), timeout=10)
    code: grpc.StatusCode = error.value.code()
    return code


@pytest.fixture
async def stack(redis_server: RedisServer, tmp_path: Path) -> AsyncIterator[Stack]:
    ports = free_edge_ports()
    env = stack_environment(ports, redis_server.url, tmp_path / "keys")
    mailer = Mailer()
    identity: ServiceRunner = build_identity(
        IdentitySettings.from_env({**env, "OPSMESH_GRPC_PORT": str(ports["identity"])}),
        mailer=mailer,
    )
    await identity.start()
    session = await start_verifying_session(env, ports, redis_server.url)
    client = connect_redis(RedisSettings(url=redis_server.url))
    accounts = Accounts(client)
    org = f"org{secrets.token_hex(4)}"
    admin = f"ada{secrets.token_hex(4)}"
    await accounts.create(org_id=org, user_id=admin, password=PASSWORD, roles="admin")
    config = tmp_path / "envoy.yaml"
    config.write_text(render(EdgeTopology.dev(ports, ratelimit_domain=f"o{secrets.token_hex(4)}")))
    envoy = envoy_process(config, tmp_path / "envoy.log")
    envoy.start(timeout=30)
    try:
        await wait_envoy_live(ports["admin"])
        async with (
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports['edge']}", timeout=30) as edge,
            aio.insecure_channel(f"127.0.0.1:{ports['edge']}") as edge_channel,
            aio.insecure_channel(f"127.0.0.1:{ports['session']}") as session_channel,
        ):
            yield Stack(
                edge=edge,
                issuer=env["OPSMESH_JWT_ISSUER"],
                orgs=organization_pb2_grpc.OrganizationServiceStub(edge_channel),
                sessions=session_pb2_grpc.SessionServiceStub(session_channel),
                redis=client,
                accounts=accounts,
                mailer=mailer,
                org=org,
                admin=admin,
            )
    finally:
        envoy.stop()
        await session.stop()
        await identity.stop()
        accounts.close()
        await client.aclose()


async def invite(stack: Stack, admin: Mapping[str, str], email: str, role: str) -> pb.Invitation:
    answer = await stack.orgs.InviteMember(
        pb.InviteMemberRequest(email=email, role=role), metadata=bearer(admin), timeout=10
    )
    return answer.invitation


async def accept_page(stack: Stack, link: str) -> tuple[httpx.Response, dict[str, str]]:
    page = await stack.edge.get(on_edge(link))
    return page, dict(HIDDEN.findall(page.text))


async def accept_as_new(stack: Stack, link: str, username: str) -> httpx.Response:
    page, form = await accept_page(stack, link)
    if page.status_code != 200:
        return page
    return await stack.edge.post(
        "/invitations/accept",
        data={**form, "username": username, "password": NEW_PASSWORD, "confirm": NEW_PASSWORD},
        headers={"Origin": "null"},  # what a browser sends under Referrer-Policy: no-referrer
    )


async def member_roles(stack: Stack, admin: Mapping[str, str]) -> dict[str, list[str]]:
    members = await stack.orgs.ListMembers(
        pb.ListMembersRequest(), metadata=bearer(admin), timeout=10
    )
    return {m.user_id: list(m.roles) for m in members.members}


# --- invitations, end to end ------------------------------------------------------------------


async def test_an_invited_person_signs_up_signs_in_and_is_a_member_with_the_role(
    stack: Stack,
) -> None:
    admin = await stack.tokens(stack.admin)
    email = f"new{secrets.token_hex(4)}@example.com"
    invitation = await invite(stack, admin, email, "operator")
    assert invitation.state == pb.INVITATION_STATE_PENDING
    assert (invitation.email, invitation.role, invitation.invited_by) == (
        email,
        "operator",
        stack.admin,
    )

    mail = [m for m in stack.mailer.sent if m.to == email]
    assert [m.template for m in mail] == ["org_invitation"]
    assert mail[0].org_id == stack.org
    assert mail[0].data["role"] == "operator"
    assert mail[0].data["inviter_name"] == stack.admin
    link = stack.mailer.link_to(email)
    assert link.startswith(f"{stack.issuer}/invitations/accept?token=")

    page, _ = await accept_page(stack, link)
    assert page.status_code == 200, page.text
    assert page.headers["referrer-policy"] == "no-referrer"
    username = f"nina{secrets.token_hex(3)}"
    joined = await accept_as_new(stack, link, username)
    assert joined.status_code == 200, joined.text

    mine = await stack.orgs.ListMyOrganizations(
        pb.ListMyOrganizationsRequest(), metadata=bearer(await stack.tokens(username, NEW_PASSWORD))
    )
    assert [(o.org_id, list(o.roles), o.current) for o in mine.organizations] == [
        (stack.org, ["operator"], True)
    ]
    assert (await member_roles(stack, admin))[username] == ["operator"]
    listed = await stack.orgs.ListInvitations(
        pb.ListInvitationsRequest(), metadata=bearer(admin), timeout=10
    )
    assert [(i.invitation_id, i.state, i.accepted_by) for i in listed.invitations] == [
        (invitation.invitation_id, pb.INVITATION_STATE_ACCEPTED, username)
    ]
    events = await stack.orgs.ListAuditEvents(
        pb.ListAuditEventsRequest(), metadata=bearer(admin), timeout=10
    )
    assert [(e.action, e.actor, e.target) for e in events.events] == [
        ("invitation.accepted", username, invitation.invitation_id),
        ("invitation.sent", stack.admin, invitation.invitation_id),
    ]


async def test_an_existing_user_joins_a_second_org_and_switches_without_a_password(
    stack: Stack,
) -> None:
    email = f"old{secrets.token_hex(4)}@example.com"
    other_org = f"org{secrets.token_hex(4)}"
    existing = await stack.user(org=other_org, roles="admin", email=email)
    admin = await stack.tokens(stack.admin)
    await invite(stack, admin, email, "member")
    link = stack.mailer.link_to(email)

    page, form = await accept_page(stack, link)
    assert page.status_code == 200, page.text
    joined = await stack.edge.post(
        "/invitations/accept",
        data={**form, "username": existing, "password": PASSWORD},
        headers={"Origin": "null", "X-Forwarded-For": some_address()},
    )
    assert joined.status_code == 200, joined.text

    tokens = await stack.tokens(existing)  # signs in to the org the account was made in
    mine = await stack.orgs.ListMyOrganizations(
        pb.ListMyOrganizationsRequest(), metadata=bearer(tokens), timeout=10
    )
    assert {(o.org_id, tuple(o.roles), o.current) for o in mine.organizations} == {
        (other_org, ("admin",), True),
        (stack.org, ("member",), False),
    }
    switched = await stack.edge.post(
        "/oauth/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": tokens["refresh_token"],
            "client_id": CLIENT,
            "org_id": stack.org,
        },
    )
    assert switched.status_code == 200, switched.text
    now = switched.json()
    mine = await stack.orgs.ListMyOrganizations(
        pb.ListMyOrganizationsRequest(), metadata=bearer(now), timeout=10
    )
    assert [o.org_id for o in mine.organizations if o.current] == [stack.org]
    # A member, not an admin, in the org switched to; the session of the other org is over.
    assert (
        await refused(stack.orgs.ListAuditEvents, pb.ListAuditEventsRequest(), now)
        == grpc.StatusCode.PERMISSION_DENIED
    )
    assert await status_with_token(stack.sessions, tokens["access_token"]) != grpc.StatusCode.OK

    # An org the user does not belong to is refused, and the session stays as it was.
    foreign = await stack.edge.post(
        "/oauth/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": now["refresh_token"],
            "client_id": CLIENT,
            "org_id": f"org{secrets.token_hex(4)}",
        },
    )
    assert foreign.status_code == 400
    assert foreign.json()["error"] == "invalid_request"
    assert await status_with_token(stack.sessions, now["access_token"]) == grpc.StatusCode.OK


async def test_used_revoked_expired_tampered_and_replaced_links_make_no_member(
    stack: Stack,
) -> None:
    admin = await stack.tokens(stack.admin)

    async def link_for(role: str = "member") -> tuple[str, pb.Invitation]:
        email = f"p{secrets.token_hex(4)}@example.com"
        invitation = await invite(stack, admin, email, role)
        return stack.mailer.link_to(email), invitation

    used, _ = await link_for()
    assert (await accept_as_new(stack, used, f"a{secrets.token_hex(3)}")).status_code == 200
    again = await accept_as_new(stack, used, f"b{secrets.token_hex(3)}")
    assert again.status_code == 410
    assert "already accepted" in again.text

    revoked, invitation = await link_for()
    await stack.orgs.RevokeInvitation(
        pb.RevokeInvitationRequest(invitation_id=invitation.invitation_id),
        metadata=bearer(admin),
        timeout=10,
    )
    assert (await accept_as_new(stack, revoked, f"c{secrets.token_hex(3)}")).status_code == 410

    expired, invitation = await link_for()
    # Time travel: the invitation's expiry moves into the past (a week is long for a test).
    await stack.redis.hset(f"opsmesh:id:inv:{invitation.invitation_id}", "expires", "1000")
    answer = await accept_as_new(stack, expired, f"d{secrets.token_hex(3)}")
    assert answer.status_code == 410
    assert "expired" in answer.text

    tampered, _ = await link_for()
    flipped = tampered[:-1] + ("A" if tampered[-1] != "A" else "B")
    assert (await accept_as_new(stack, flipped, f"e{secrets.token_hex(3)}")).status_code == 404

    replaced, invitation = await link_for()
    resent = await stack.orgs.ResendInvitation(
        pb.ResendInvitationRequest(invitation_id=invitation.invitation_id),
        metadata=bearer(admin),
        timeout=10,
    )
    assert resent.invitation.sends == 2
    assert (await accept_as_new(stack, replaced, f"f{secrets.token_hex(3)}")).status_code == 404
    fresh = stack.mailer.link_to(invitation.email)
    assert fresh != replaced
    assert (await accept_as_new(stack, fresh, f"g{secrets.token_hex(3)}")).status_code == 200

    members = await member_roles(stack, admin)
    assert sorted(user[0] for user in members if user != stack.admin) == ["a", "g"]


async def test_concurrent_acceptances_of_one_link_make_exactly_one_member(stack: Stack) -> None:
    admin = await stack.tokens(stack.admin)
    email = f"race{secrets.token_hex(4)}@example.com"
    await invite(stack, admin, email, "member")
    token = parse_qs(urlsplit(stack.mailer.link_to(email)).query)["token"][0]
    invitations = _invitations(stack)
    names = [f"r{i}{secrets.token_hex(3)}" for i in range(8)]
    outcomes = await asyncio.gather(
        *(invitations.accept_new_account(token, user_id=n, password=NEW_PASSWORD) for n in names),
        return_exceptions=True,
    )
    winners = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(winners) == 1, outcomes
    assert {getattr(o, "state", None) for o in outcomes if isinstance(o, BaseException)} == {"used"}
    members = await member_roles(stack, admin)
    assert [n for n in names if n in members] == [winners[0].user_id]
    # The losers left no account behind either.
    assert [n for n in names if await stack.accounts.find(n) is not None] == [winners[0].user_id]


def _invitations(stack: Stack) -> Invitations:
    """The invitation flows in-process, on the stack's Redis (the page's Python API)."""
    return Invitations(
        stack.redis,
        accounts=stack.accounts,
        mailer=stack.mailer,
        audit=AuditLog(stack.redis),
        issuer=stack.issuer,
    )


# --- who may do what --------------------------------------------------------------------------


async def test_only_admins_invite_change_roles_remove_and_read_the_log(stack: Stack) -> None:
    member = await stack.tokens(await stack.user(roles="member"))
    other = await stack.user(roles="member")
    denied = grpc.StatusCode.PERMISSION_DENIED
    calls = [
        (stack.orgs.InviteMember, pb.InviteMemberRequest(email="x@example.com", role="admin")),
        (stack.orgs.ChangeMemberRole, pb.ChangeMemberRoleRequest(user_id=other, role="admin")),
        (stack.orgs.RemoveMember, pb.RemoveMemberRequest(user_id=other)),
        (stack.orgs.ListInvitations, pb.ListInvitationsRequest()),
        (stack.orgs.ListAuditEvents, pb.ListAuditEventsRequest()),
    ]
    for call, request in calls:
        assert await refused(call, request, member) == denied, call
    assert not [m for m in stack.mailer.sent if m.to == "x@example.com"]
    # Members may see who is in the org.
    listed = await stack.orgs.ListMembers(pb.ListMembersRequest(), metadata=bearer(member))
    assert other in {m.user_id for m in listed.members}


async def test_another_orgs_invitations_and_members_are_not_found(stack: Stack) -> None:
    admin = await stack.tokens(stack.admin)
    elsewhere_org = f"org{secrets.token_hex(4)}"
    elsewhere = await stack.tokens(await stack.user(org=elsewhere_org, roles="admin"))
    stranger = await stack.user(org=elsewhere_org)
    theirs = await invite(stack, elsewhere, f"t{secrets.token_hex(4)}@example.com", "member")
    not_found = grpc.StatusCode.NOT_FOUND
    for call, request in [
        (
            stack.orgs.RevokeInvitation,
            pb.RevokeInvitationRequest(invitation_id=theirs.invitation_id),
        ),
        (
            stack.orgs.ResendInvitation,
            pb.ResendInvitationRequest(invitation_id=theirs.invitation_id),
        ),
        (stack.orgs.RemoveMember, pb.RemoveMemberRequest(user_id=stranger)),
        (stack.orgs.ChangeMemberRole, pb.ChangeMemberRoleRequest(user_id=stranger, role="admin")),
    ]:
        assert await refused(call, request, admin) == not_found, call
    bad = grpc.StatusCode.INVALID_ARGUMENT
    assert (
        await refused(
            stack.orgs.InviteMember,
            pb.InviteMemberRequest(email="x@example.com", role="owner"),
            admin,
        )
        == bad
    )
    assert (
        await refused(
            stack.orgs.InviteMember,
            pb.InviteMemberRequest(email="not an email", role="member"),
            admin,
        )
        == bad
    )
    assert (
        await refused(
            stack.orgs.RevokeInvitation, pb.RevokeInvitationRequest(invitation_id="nope"), admin
        )
        == bad
    )
    assert (
        await refused(stack.orgs.ListMembers, pb.ListMembersRequest(page_token="garbage"), admin)
        == bad
    )


async def test_the_last_admin_can_be_neither_removed_nor_demoted(stack: Stack) -> None:
    admin = await stack.tokens(stack.admin)
    precondition = grpc.StatusCode.FAILED_PRECONDITION
    assert (
        await refused(stack.orgs.RemoveMember, pb.RemoveMemberRequest(user_id=stack.admin), admin)
        == precondition
    )
    assert (
        await refused(
            stack.orgs.ChangeMemberRole,
            pb.ChangeMemberRoleRequest(user_id=stack.admin, role="member"),
            admin,
        )
        == precondition
    )
    second = await stack.user(roles="member")
    before = await stack.tokens(second)
    await stack.orgs.ChangeMemberRole(
        pb.ChangeMemberRoleRequest(user_id=second, role="admin"), metadata=bearer(admin)
    )
    # A raised role ends no session; the next refresh carries it.
    assert await status_with_token(stack.sessions, before["access_token"]) == grpc.StatusCode.OK
    promoted = await refresh_grant(stack.edge, before["refresh_token"], CLIENT)
    assert claims(promoted.json()["access_token"])["roles"] == ["admin"]
    # With a second admin, the first may step down (and is then no admin any more).
    await stack.orgs.ChangeMemberRole(
        pb.ChangeMemberRoleRequest(user_id=stack.admin, role="member"), metadata=bearer(admin)
    )
    assert (await member_roles(stack, await stack.tokens(second)))[stack.admin] == ["member"]


async def test_removal_and_demotion_take_effect_on_the_next_call(stack: Stack) -> None:
    admin = await stack.tokens(stack.admin)
    leaving = await stack.user(roles="member")
    demoted = await stack.user(roles="admin")
    leaving_tokens = await stack.tokens(leaving)
    demoted_tokens = await stack.tokens(demoted)
    for tokens in (leaving_tokens, demoted_tokens):
        assert await status_with_token(stack.sessions, tokens["access_token"]) == grpc.StatusCode.OK

    await stack.orgs.RemoveMember(pb.RemoveMemberRequest(user_id=leaving), metadata=bearer(admin))
    await stack.orgs.ChangeMemberRole(
        pb.ChangeMemberRoleRequest(user_id=demoted, role="member"), metadata=bearer(admin)
    )

    for tokens in (leaving_tokens, demoted_tokens):
        # Another service refuses the access token at once (the revocation feed), the edge's
        # identity service too, and the refresh token is dead.
        assert (
            await status_with_token(stack.sessions, tokens["access_token"])
            == grpc.StatusCode.UNAUTHENTICATED
        )
        assert (
            await refused(stack.orgs.ListMembers, pb.ListMembersRequest(), tokens)
            == grpc.StatusCode.UNAUTHENTICATED
        )
        again = await stack.edge.post(
            "/oauth/token",
            data={
                "grant_type": "refresh_token",
                "refresh_token": tokens["refresh_token"],
                "client_id": CLIENT,
            },
        )
        assert again.json()["error"] == "invalid_grant"
    # The demoted one signs in again as a member; the removed one has no org left to enter.
    fresh = await stack.tokens(demoted)
    assert (
        await refused(stack.orgs.ListAuditEvents, pb.ListAuditEventsRequest(), fresh)
        == grpc.StatusCode.PERMISSION_DENIED
    )
    _, challenge = pkce()
    form = await login_form(stack.edge, challenge)
    no_org = await sign_in(stack.edge, leaving, PASSWORD, some_address(), form=form)
    assert no_org.status_code == 403
    events = await stack.orgs.ListAuditEvents(
        pb.ListAuditEventsRequest(page_size=2), metadata=bearer(admin)
    )
    assert [(e.action, e.target) for e in events.events] == [
        ("member.role_changed", demoted),
        ("member.removed", leaving),
    ]
    assert events.events[0].details == {"role": "member", "previous_roles": "admin"}


async def test_a_notify_outage_leaves_no_invitation_and_a_failed_resend_keeps_the_old_link(
    stack: Stack,
) -> None:
    admin = await stack.tokens(stack.admin)
    email = f"o{secrets.token_hex(4)}@example.com"
    stack.mailer.down = True
    assert (
        await refused(
            stack.orgs.InviteMember, pb.InviteMemberRequest(email=email, role="member"), admin
        )
        == grpc.StatusCode.UNAVAILABLE
    )
    listed = await stack.orgs.ListInvitations(pb.ListInvitationsRequest(), metadata=bearer(admin))
    assert not [i for i in listed.invitations if i.email == email]

    stack.mailer.down = False
    invitation = await invite(stack, admin, email, "member")
    link = stack.mailer.link_to(email)
    stack.mailer.down = True
    assert (
        await refused(
            stack.orgs.ResendInvitation,
            pb.ResendInvitationRequest(invitation_id=invitation.invitation_id),
            admin,
        )
        == grpc.StatusCode.UNAVAILABLE
    )
    stack.mailer.down = False
    page, _ = await accept_page(stack, link)
    assert page.status_code == 200, page.text
    # A second invitation of a pending address is refused: resend the first.
    assert (
        await refused(
            stack.orgs.InviteMember, pb.InviteMemberRequest(email=email, role="admin"), admin
        )
        == grpc.StatusCode.ALREADY_EXISTS
    )


async def test_lists_page_through_members_and_audit_events(stack: Stack) -> None:
    admin = await stack.tokens(stack.admin)
    for _ in range(4):
        await stack.user()
    seen: list[str] = []
    token = ""
    while True:
        page = await stack.orgs.ListMembers(
            pb.ListMembersRequest(page_size=2, page_token=token), metadata=bearer(admin)
        )
        seen += [m.user_id for m in page.members]
        token = page.next_page_token
        if not token:
            break
    assert seen == sorted(seen)
    assert len(seen) == 5
