"""Issue #17, the invitation page (``/invitations/accept``) through the real edge: a new person
signs up into the organization, an existing user signs in to join, and links that no longer
work get a page that says why, never a membership."""

from __future__ import annotations

import secrets
from urllib.parse import urlsplit

import httpx
import pytest

from identity_svc.accounts import Accounts
from identity_svc.audit import AuditLog
from identity_svc.invitations import Invitations
from tests.test_identity_attacks import PASSWORD, sign_in, some_address
from tests.test_password_reset import HIDDEN, RecordingMailer, Stack, stack

__all__ = ["stack"]  # the fixture, shared with the password reset tests
NEW_PASSWORD = "a sentence nobody guesses"


async def invite(
    stack: Stack, email: str, role: str = "member", org: str = "acme"
) -> tuple[str, str]:
    """Invites ``email`` to ``org`` (as its admin would): the link mailed, the invitation id."""
    mailer = RecordingMailer()
    accounts = Accounts(stack.redis)
    try:
        invitations = Invitations(
            stack.redis,
            accounts=accounts,
            mailer=mailer,
            audit=AuditLog(stack.redis),
            issuer=stack.issuer,
        )
        # Display names are an operator's HSET until organizations get an API of their own.
        name = "Acme & Co" if org == "acme" else org.title()
        await stack.redis.hset("opsmesh:id:orgnames", org, name)
        invitation = await invitations.invite(org_id=org, email=email, role=role, inviter="ada")
    finally:
        accounts.close()
    (sent,) = mailer.to(email, "org_invitation")
    return str(sent.data["accept_url"]), invitation.invitation_id


def on_edge(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


async def accept(
    stack: Stack, link: str, headers: dict[str, str] | None = None, **fields: str
) -> httpx.Response:
    page = await stack.edge.get(on_edge(link))
    assert page.status_code == 200, page.text
    return await stack.edge.post(
        "/invitations/accept",
        data={**dict(HIDDEN.findall(page.text)), **fields},
        headers={"Origin": "null", "X-Forwarded-For": some_address(), **(headers or {})},
    )


async def test_a_new_person_signs_up_into_the_organization(stack: Stack) -> None:
    email = f"new{secrets.token_hex(4)}@example.com"
    user = f"newbie{secrets.token_hex(3)}"
    link, _ = await invite(stack, email, role="admin")
    assert link.startswith(f"{stack.issuer}/invitations/accept?token=")
    page = await stack.edge.get(on_edge(link))
    assert page.status_code == 200
    assert page.headers["referrer-policy"] == "no-referrer"
    assert "Join Acme &amp; Co" in page.text
    assert email in page.text
    assert 'action="/invitations/accept"' in page.text  # the token is not in the POST's URL

    weak = await accept(stack, link, username=user, password="password1234", confirm="password1234")
    assert weak.status_code == 400
    assert "most common" in weak.text
    taken = await accept(
        stack, link, username=stack.user, password=NEW_PASSWORD, confirm=NEW_PASSWORD
    )
    assert taken.status_code == 400
    assert "taken" in taken.text
    joined = await accept(stack, link, username=user, password=NEW_PASSWORD, confirm=NEW_PASSWORD)
    assert joined.status_code == 200, joined.text
    assert "You are a member of Acme &amp; Co as admin" in joined.text

    assert (await sign_in(stack.edge, user, NEW_PASSWORD, some_address())).status_code == 302
    memberships = await Accounts(stack.redis).memberships.of_user(user)
    assert memberships == {"acme": frozenset({"admin"})}
    used = await stack.edge.get(on_edge(link))
    assert used.status_code == 410
    assert "already accepted" in used.text


async def test_an_existing_user_signs_in_to_join(stack: Stack) -> None:
    link, _ = await invite(stack, stack.email, org="globex")  # stack.user is in acme already
    page = await stack.edge.get(on_edge(link))
    assert "Join Globex" in page.text
    assert "You already have an account" in page.text
    wrong = await accept(stack, link, username=stack.user, password="not the password")
    assert wrong.status_code == 401
    assert "Wrong user or password" in wrong.text
    joined = await accept(stack, link, username=stack.user, password=PASSWORD)
    assert joined.status_code == 200, joined.text
    memberships = await Accounts(stack.redis).memberships.of_user(stack.user)
    assert memberships["globex"] == frozenset({"member"})
    assert (await stack.edge.get(on_edge(link))).status_code == 410


async def test_an_invitation_for_another_address_gives_no_membership(stack: Stack) -> None:
    other = f"other{secrets.token_hex(4)}"
    accounts = Accounts(stack.redis)
    try:
        await accounts.create(
            org_id="globex", user_id=other, password=PASSWORD, email=f"{other}@example.com"
        )
    finally:
        accounts.close()
    link, _ = await invite(stack, f"{other}@example.com")
    # Someone else's link, signed in with one's own (valid) account.
    foreign = await accept(stack, link, username=stack.user, password=PASSWORD)
    assert foreign.status_code == 403
    assert "another email address" in foreign.text
    assert "acme" not in await Accounts(stack.redis).memberships.of_user(other)


async def test_revoked_and_made_up_links_get_a_clear_page(stack: Stack) -> None:
    email = f"gone{secrets.token_hex(4)}@example.com"
    link, invitation_id = await invite(stack, email)
    accounts = Accounts(stack.redis)
    try:
        await Invitations(
            stack.redis,
            accounts=accounts,
            mailer=RecordingMailer(),
            audit=AuditLog(stack.redis),
            issuer=stack.issuer,
        ).revoke(org_id="acme", invitation_id=invitation_id, actor="ada")
    finally:
        accounts.close()
    revoked = await stack.edge.get(on_edge(link))
    assert revoked.status_code == 410
    assert "withdrawn" in revoked.text
    made_up = await stack.edge.get("/invitations/accept", params={"token": "x" * 43})
    assert made_up.status_code == 404
    assert "does not work" in made_up.text
    assert made_up.headers["referrer-policy"] == "no-referrer"


@pytest.mark.parametrize("origin", ["https://evil.example", None])
async def test_an_accept_posted_from_elsewhere_is_refused(stack: Stack, origin: str | None) -> None:
    link, _ = await invite(stack, f"csrf{secrets.token_hex(4)}@example.com")
    page = await stack.edge.get(on_edge(link))
    fields = {
        **dict(HIDDEN.findall(page.text)),
        "username": f"csrf{secrets.token_hex(3)}",
        "password": NEW_PASSWORD,
        "confirm": NEW_PASSWORD,
    }
    if origin is None:  # another site's page: the browser sends none of our cookies
        async with httpx.AsyncClient(base_url=str(stack.edge.base_url)) as cookieless:
            refused = await cookieless.post("/invitations/accept", data=fields)
    else:
        refused = await stack.edge.post(
            "/invitations/accept", data=fields, headers={"Origin": origin}
        )
    assert refused.status_code == 403
    assert (await stack.edge.get(on_edge(link))).status_code == 200  # still pending
