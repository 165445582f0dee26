"""Issue #17: memberships, accounts from before memberships, invitation settings (real Redis)."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from devtools.servers import RedisServer
from identity_svc.accounts import Accounts
from identity_svc.invitations import InvitationSettings
from identity_svc.organizations import Membership, Memberships, RoleChange, parse_org_role
from mesh.context import PLATFORM_ROLES
from mesh.errors import FailedPrecondition, InvalidArgument, NotFound
from mesh.redisconn import RedisSettings, connect_redis
from mesh.settings import SettingsError, load

PASSWORD = "correct horse battery"


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    redis = connect_redis(RedisSettings(url=redis_server.url))
    try:
        yield redis
    finally:
        await redis.aclose()


def _name(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(4)}"


async def test_an_account_from_before_memberships_gets_its_membership_once(
    client: aioredis.Redis,
) -> None:
    user, org = _name("old"), _name("org")
    # A record as accounts.py wrote it before memberships: the org and roles inside it.
    await client.set(f"opsmesh:id:user:{user}", json.dumps({"org": org, "roles": ["admin"]}))
    accounts = Accounts(client)
    try:
        account = await accounts.find(user)
        assert account is not None
        assert (account.org_id, account.roles, account.orgs) == (
            org,
            frozenset({"admin"}),
            frozenset({org}),
        )
        memberships = accounts.memberships
        assert [m.user_id for m in await memberships.members(org)] == [user]

        # Removed (another admin first): a later read must not bring the membership back.
        await memberships.change_roles(org, await _member(accounts, org), "admin")
        await memberships.remove(org, user)
        again = await accounts.find(user)
        assert again is not None
        assert (again.org_id, again.orgs) == ("", frozenset())
        assert await memberships.get(org, user) is None
    finally:
        accounts.close()


async def _member(accounts: Accounts, org: str) -> str:
    user = _name("m")
    await accounts.create(org_id=org, user_id=user, password=PASSWORD, roles="member")
    return user


async def test_concurrent_demotions_of_two_admins_leave_one_admin(client: aioredis.Redis) -> None:
    accounts = Accounts(client)
    memberships = Memberships(client)
    org = _name("org")
    try:
        admins = [_name("a"), _name("b")]
        for admin in admins:
            await accounts.create(org_id=org, user_id=admin, password=PASSWORD, roles="admin")
        outcomes = await asyncio.gather(
            *(memberships.change_roles(org, admin, "member") for admin in admins),
            return_exceptions=True,
        )
        assert sorted(type(o).__name__ for o in outcomes) == ["FailedPrecondition", "RoleChange"]
        assert [m.user_id for m in await memberships.members(org) if m.is_admin] != []
        with pytest.raises(NotFound):
            await memberships.remove(org, _name("nobody"))
        with pytest.raises(FailedPrecondition):
            await memberships.remove(
                org, next(m.user_id for m in await memberships.members(org) if m.is_admin)
            )
    finally:
        accounts.close()


def test_the_invitation_lifetime_is_read_and_checked() -> None:
    assert load(InvitationSettings, {}).ttl == 7 * 86400
    assert load(InvitationSettings, {"OPSMESH_INVITATION_TTL": "2d"}).ttl == 2 * 86400
    with pytest.raises(SettingsError) as refused:
        load(InvitationSettings, {"OPSMESH_INVITATION_TTL": "10s"})
    assert "OPSMESH_INVITATION_TTL" in str(refused.value)


@pytest.mark.parametrize(
    ("previous", "now", "lowered"),
    [
        ({"member"}, "admin", False),
        ({"operator"}, "admin", False),
        ({"admin"}, "operator", True),
        ({"admin", "operator"}, "admin", False),
        ({"admin", "operator"}, "operator", True),
        ({"auditor"}, "admin", True),  # a role outside the ranks is simply gone
        ({"member"}, "member", False),
    ],
)
def test_a_role_change_ends_sessions_only_when_something_is_lost(
    previous: set[str], now: str, lowered: bool
) -> None:
    membership = Membership(org_id="o", user_id="u", roles=frozenset({now}))
    assert RoleChange(membership=membership, previous=frozenset(previous)).lowered is lowered


@pytest.mark.parametrize("role", sorted(PLATFORM_ROLES))
def test_an_org_admin_cannot_hand_out_a_platform_role(role: str) -> None:
    # Platform roles read every organization's data: invitations and role changes refuse them.
    with pytest.raises(InvalidArgument):
        parse_org_role(role)
