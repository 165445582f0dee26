"""Memberships: which users belong to which organizations, with which roles, in identity's Redis.

Two hashes hold every membership, written together in one Lua script so they never disagree:
``{prefix}members:<org>`` (user -> roles) answers "who is in this org", ``{prefix}orgs:<user>``
(org -> roles) answers "where does this user belong" (sign-in, switching org, refresh).
Joining times live in ``{prefix}joined:<org>``. Roles are stored comma-separated and sorted;
an organization must keep at least one admin, checked inside the same script that changes it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from mesh.errors import FailedPrecondition, InvalidArgument, NotFound
from mesh.redisconn import redis_errors

ADMIN_ROLE = "admin"
ORG_ROLES = ("admin", "operator", "member")
"""The roles an invitation or a role change may give (a membership may hold others, set by the
operator's ``python -m identity_svc.accounts create --roles``)."""
_RANK = {"member": 0, "operator": 1, "admin": 2}
"""Each role of ORG_ROLES grants what the ones below it grant."""
DEFAULT_PREFIX = "opsmesh:id:"

# Lua helpers shared by every script that writes memberships (accounts and invitations include
# them): both hashes and the joining time in one step.
MEMBERSHIP_LUA = """
local function put_member(prefix, org, user, roles, joined)
  redis.call('HSET', prefix .. 'members:' .. org, user, roles)
  redis.call('HSET', prefix .. 'orgs:' .. user, org, roles)
  redis.call('HSETNX', prefix .. 'joined:' .. org, user, joined)
end
local function is_admin(roles)
  return string.find(',' .. roles .. ',', ',admin,', 1, true) ~= nil
end
local function admins_besides(prefix, org, user)
  local all = redis.call('HGETALL', prefix .. 'members:' .. org)
  local count = 0
  for i = 1, #all, 2 do
    if all[i] ~= user and is_admin(all[i + 1]) then count = count + 1 end
  end
  return count
end
"""

# ARGV: prefix, org, user, new roles ('' removes the member). Refuses to leave the org without
# an admin; replies {'ok', previous roles} or {'missing'} / {'last_admin'}.
_CHANGE = (
    MEMBERSHIP_LUA
    + """
local prefix, org, user, roles = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local previous = redis.call('HGET', prefix .. 'members:' .. org, user)
if not previous then return {'missing'} end
if is_admin(previous) and not is_admin(roles) and admins_besides(prefix, org, user) == 0 then
  return {'last_admin'}
end
if roles == '' then
  redis.call('HDEL', prefix .. 'members:' .. org, user)
  redis.call('HDEL', prefix .. 'orgs:' .. user, org)
  redis.call('HDEL', prefix .. 'joined:' .. org, user)
else
  put_member(prefix, org, user, roles, ARGV[5])
end
return {'ok', previous}
"""
)


@dataclass(frozen=True, kw_only=True, slots=True)
class Membership:
    org_id: str
    user_id: str
    roles: frozenset[str]
    joined_at: float | None = None
    """Seconds since the epoch; None for a membership from before joining times were kept."""

    @property
    def is_admin(self) -> bool:
        return ADMIN_ROLE in self.roles


@dataclass(frozen=True, kw_only=True, slots=True)
class RoleChange:
    membership: Membership
    previous: frozenset[str]

    @property
    def lowered(self) -> bool:
        """True when the member lost something a role granted (their sessions must end: tokens
        carry roles). Going up (member to admin) loses nothing; a role outside ORG_ROLES that
        is gone always counts as lost."""
        top = max((_RANK[role] for role in self.membership.roles if role in _RANK), default=-1)
        lost = self.previous - self.membership.roles
        return any(_RANK.get(role, top + 1) > top for role in lost)


def join_roles(roles: frozenset[str]) -> str:
    return ",".join(sorted(roles))


def split_roles(value: str | bytes) -> frozenset[str]:
    text = value.decode() if isinstance(value, bytes) else value
    return frozenset(role for role in text.split(",") if role)


def parse_org_role(role: str, *, field: str = "role") -> str:
    """One of ORG_ROLES, or INVALID_ARGUMENT naming the field."""
    if role not in ORG_ROLES:
        raise InvalidArgument(f"{field} must be one of {', '.join(ORG_ROLES)}", field=field)
    return role


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Memberships:
    def __init__(self, client: aioredis.Redis, *, prefix: str = DEFAULT_PREFIX) -> None:
        self._redis = client
        self.prefix = prefix
        self._change = client.register_script(_CHANGE)

    def members_key(self, org_id: str) -> str:
        return f"{self.prefix}members:{org_id}"

    def orgs_key(self, user_id: str) -> str:
        return f"{self.prefix}orgs:{user_id}"

    def _joined_key(self, org_id: str) -> str:
        return f"{self.prefix}joined:{org_id}"

    def _names_key(self) -> str:
        # Display names, set by an operator (HSET opsmesh:id:orgnames <org> <name>) until
        # organizations get an API of their own; an org without one is named by its id.
        return f"{self.prefix}orgnames"

    async def of_user(self, user_id: str) -> dict[str, frozenset[str]]:
        """Every organization of ``user_id`` with its roles there."""
        with redis_errors():
            raw = await self._redis.hgetall(self.orgs_key(user_id))
        return {_text(org): split_roles(roles) for org, roles in raw.items()}

    async def get(self, org_id: str, user_id: str) -> Membership | None:
        with redis_errors():
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hget(self.members_key(org_id), user_id)
                pipe.hget(self._joined_key(org_id), user_id)
                roles, joined = await pipe.execute()
        if roles is None:
            return None
        return Membership(
            org_id=org_id,
            user_id=user_id,
            roles=split_roles(roles),
            joined_at=int(joined) / 1000 if joined else None,
        )

    async def members(self, org_id: str) -> list[Membership]:
        """Every member of ``org_id``, by user id."""
        with redis_errors():
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(self.members_key(org_id))
                pipe.hgetall(self._joined_key(org_id))
                roles, joined = await pipe.execute()
        times = {_text(user): int(ms) / 1000 for user, ms in joined.items()}
        return sorted(
            (
                Membership(
                    org_id=org_id,
                    user_id=_text(user),
                    roles=split_roles(value),
                    joined_at=times.get(_text(user)),
                )
                for user, value in roles.items()
            ),
            key=lambda membership: membership.user_id,
        )

    async def org_names(self, org_ids: list[str]) -> dict[str, str]:
        """Display names of organizations; an organization without one is named by its id."""
        if not org_ids:
            return {}
        with redis_errors():
            names = await self._redis.hmget(self._names_key(), org_ids)
        return {org: _text(name) if name else org for org, name in zip(org_ids, names, strict=True)}

    async def change_roles(self, org_id: str, user_id: str, role: str) -> RoleChange:
        """Gives the member exactly ``role``; NotFound for a non-member, FailedPrecondition when
        that would leave the organization without an admin."""
        previous = await self._run_change(org_id, user_id, role)
        membership = await self.get(org_id, user_id)
        if membership is None:  # removed between the change and this read
            raise NotFound(f"{user_id} is not a member of this organization")
        return RoleChange(membership=membership, previous=previous)

    async def remove(self, org_id: str, user_id: str) -> frozenset[str]:
        """Removes the member and returns the roles they had (same refusals as change_roles)."""
        return await self._run_change(org_id, user_id, "")

    async def _run_change(self, org_id: str, user_id: str, roles: str) -> frozenset[str]:
        with redis_errors():
            reply = await self._change(
                keys=[self.members_key(org_id), self.orgs_key(user_id)],
                args=[self.prefix, org_id, user_id, roles, int(time.time() * 1000)],
            )
        outcome = _text(reply[0])
        if outcome == "missing":
            raise NotFound(f"{user_id} is not a member of this organization")
        if outcome == "last_admin":
            raise FailedPrecondition(
                "the organization needs an admin: make another member admin first"
            )
        return split_roles(reply[1])
