"""Invitations to join an organization: single use, hashed at rest, expiring, revocable.

An admin invites an email address with a role (OrganizationService.InviteMember); the
``org_invitation`` email carries ``<issuer>/invitations/accept?token=<token>`` (the page in
identity_svc/invitation_pages.py). Redis keeps only the token's SHA-256:

- ``{prefix}inv:<id>``: the invitation (org, email, role, who invited, state, expiry, the current
  token's digest, sends, who accepted); kept ``KEPT_AFTER_END`` past its expiry or end, so that
  a late click gets "used" / "revoked" / "expired" instead of a bare "unknown".
- ``{prefix}invtok:<sha256>``: token digest -> invitation id (same lifetime).
- ``{prefix}invs:<org>``: the org's invitations by creation time (the list);
  ``{prefix}invpending:<org>``: casefolded email -> id, one pending invitation per address.
  Both expire with the org's longest-lived invitation (each invite or resend extends them).

The email goes out before the invitation (or a resend's new token) is stored: when notify_svc
is down, InviteMember answers UNAVAILABLE and nothing is left behind, and a failed resend leaves
the previous link working. Resending gives a new token and expiry; the old link then is
``unknown`` (its key is gone), like a link never issued.

Accepting is one Lua script: it checks the token (current, pending, not expired), adds the
membership (creating the account first for a new person) and marks the invitation used, all or
nothing, so two concurrent acceptances of one link make exactly one membership.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import redis.asyncio as aioredis

from identity_svc.accounts import CREATE_ACCOUNT_LUA, Accounts, parse_email
from identity_svc.audit import AuditLog
from identity_svc.mail import Mailer
from identity_svc.organizations import (
    Membership,
    parse_org_role,
    split_roles,
)
from identity_svc.passwords import check_password
from mesh.downstream import downstream_errors
from mesh.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from mesh.redisconn import redis_errors
from mesh.settings import seconds

ACCEPT_PATH = "/invitations/accept"
"""Where the email's link points (the page in identity_svc/invitation_pages.py)."""
KEPT_AFTER_END = 30 * 86400.0
"""How long an invitation stays listed (and explained to a late click) after it ended."""
TEMPLATE = "org_invitation"
_TOKEN = re.compile(r"[A-Za-z0-9_-]{20,100}")


@dataclass(frozen=True, kw_only=True)
class InvitationSettings:
    ttl: float = seconds("OPSMESH_INVITATION_TTL", 7 * 86400.0, minimum=300, maximum=90 * 86400)
    """How long an invitation link works (OPSMESH_INVITATION_TTL); a resend starts it again."""


class InvitationProblem(FailedPrecondition):
    """A token that cannot be accepted. ``state`` says why: ``expired``, ``revoked``, ``used``,
    ``unknown`` (never issued, tampered with, or replaced by a resend) or ``foreign`` (the
    account accepting it is not the invited email address)."""

    def __init__(self, state: str) -> None:
        super().__init__(f"the invitation cannot be accepted: {state}")
        self.state = state


@dataclass(frozen=True, kw_only=True, slots=True)
class Invitation:
    invitation_id: str
    org_id: str
    email: str
    role: str
    invited_by: str
    state: str
    """``pending``, ``accepted``, ``revoked`` or ``expired`` (pending past its expiry)."""
    created_at: float
    expires_at: float
    sends: int
    accepted_by: str
    ended_at: float | None
    """When it was accepted or revoked (seconds since the epoch)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class InvitationView:
    """What the acceptance page shows of a live invitation."""

    invitation_id: str
    org_id: str
    org_name: str
    role: str
    email: str
    inviter: str
    account_exists: bool
    """An account with the invited email exists: the invitee signs in instead of signing up."""
    expires_at: float


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


# Looks a token up and (ARGV[4] == 'new' / 'existing') accepts it. ARGV: prefix, token digest,
# now (ms), mode, kept-after-end (ms), then for 'existing' the user, for 'new' the arguments of
# create_account (accounts.py). Replies {state} for a refusal, or {'ok', id, org, role, joined}
# ({'member', ...} when the user already belonged to the org: the invitation is used up anyway).
_ACCEPT = (
    CREATE_ACCOUNT_LUA
    + """
local prefix, sha, now, mode, keep = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local id = redis.call('GET', prefix .. 'invtok:' .. sha)
if not id then return {'unknown'} end
local key = prefix .. 'inv:' .. id
local inv = redis.call('HMGET', key, 'state', 'expires', 'token', 'org', 'role', 'ekey')
if not inv[1] or inv[3] ~= sha then return {'unknown'} end
if inv[1] == 'accepted' then return {'used'} end
if inv[1] == 'revoked' then return {'revoked'} end
if tonumber(inv[2]) <= now then return {'expired'} end
if mode == 'look' then return {'pending', id} end
local org, role = inv[4], inv[5]
local user, outcome = '', 'ok'
if mode == 'new' then
  user = ARGV[10]
  local created = create_account(ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10], org, role, ARGV[3])
  if created ~= 'ok' then return {created} end
else
  user = ARGV[6]
  if redis.call('EXISTS', prefix .. 'user:' .. user) == 0 then return {'no_account'} end
  if redis.call('HEXISTS', prefix .. 'orgs:' .. user, org) == 1 then
    outcome = 'member'
  else
    put_member(prefix, org, user, role, ARGV[3])
  end
end
redis.call('HSET', key, 'state', 'accepted', 'accepted_by', user, 'ended', ARGV[3])
redis.call('PEXPIRE', key, keep)
redis.call('PEXPIRE', prefix .. 'invtok:' .. sha, keep)
local pending = prefix .. 'invpending:' .. org
if redis.call('HGET', pending, inv[6]) == id then redis.call('HDEL', pending, inv[6]) end
return {outcome, id, org, redis.call('HGET', prefix .. 'orgs:' .. user, org) or role}
"""
)

# Stores a new invitation unless the address has a pending, unexpired one in the org.
# ARGV: prefix, org, id, email, email key (casefolded), role, inviter, now, expires (ms),
# token digest, kept-after-end (ms).
_CREATE = """
local prefix, org, id = ARGV[1], ARGV[2], ARGV[3]
local pending = prefix .. 'invpending:' .. org
local other = redis.call('HGET', pending, ARGV[5])
if other then
  local o = redis.call('HMGET', prefix .. 'inv:' .. other, 'state', 'expires')
  if o[1] == 'pending' and tonumber(o[2]) > tonumber(ARGV[8]) then return {'pending', other} end
end
local key = prefix .. 'inv:' .. id
local lifetime = tonumber(ARGV[9]) - tonumber(ARGV[8]) + tonumber(ARGV[11])
redis.call('HSET', key, 'org', org, 'email', ARGV[4], 'role', ARGV[6], 'invited_by', ARGV[7],
  'state', 'pending', 'created', ARGV[8], 'expires', ARGV[9], 'sends', 1, 'token', ARGV[10],
  'accepted_by', '', 'ended', 0, 'ekey', ARGV[5])
redis.call('PEXPIRE', key, lifetime)
redis.call('SET', prefix .. 'invtok:' .. ARGV[10], id, 'PX', lifetime)
redis.call('HSET', pending, ARGV[5], id)
redis.call('ZADD', prefix .. 'invs:' .. org, ARGV[8], id)
-- The org's indexes live as long as their longest-lived invitation: this newest one.
redis.call('PEXPIRE', pending, lifetime)
redis.call('PEXPIRE', prefix .. 'invs:' .. org, lifetime)
return {'ok', id}
"""

# Gives a pending invitation (expired or not) a new token and expiry, and kills the old token.
# ARGV: prefix, id, org, new token digest, now, new expiry (ms), resender, kept-after-end (ms).
_RESEND = """
local prefix, id, org = ARGV[1], ARGV[2], ARGV[3]
local key = prefix .. 'inv:' .. id
local inv = redis.call('HMGET', key, 'org', 'state', 'token', 'ekey')
if inv[1] ~= org then return {'missing'} end
if inv[2] ~= 'pending' then return {inv[2]} end
local lifetime = tonumber(ARGV[6]) - tonumber(ARGV[5]) + tonumber(ARGV[8])
redis.call('DEL', prefix .. 'invtok:' .. inv[3])
redis.call('HSET', key, 'token', ARGV[4], 'expires', ARGV[6], 'invited_by', ARGV[7])
redis.call('HINCRBY', key, 'sends', 1)
redis.call('PEXPIRE', key, lifetime)
redis.call('SET', prefix .. 'invtok:' .. ARGV[4], id, 'PX', lifetime)
redis.call('HSET', prefix .. 'invpending:' .. org, inv[4], id)
redis.call('PEXPIRE', prefix .. 'invpending:' .. org, lifetime)
redis.call('PEXPIRE', prefix .. 'invs:' .. org, lifetime)
return {'ok'}
"""

# Revokes a pending, unexpired invitation. ARGV: prefix, id, org, now (ms), kept-after-end (ms).
_REVOKE = """
local prefix, id, org = ARGV[1], ARGV[2], ARGV[3]
local key = prefix .. 'inv:' .. id
local inv = redis.call('HMGET', key, 'org', 'state', 'token', 'ekey', 'expires')
if inv[1] ~= org then return {'missing'} end
if inv[2] ~= 'pending' then return {inv[2]} end
if tonumber(inv[5]) <= tonumber(ARGV[4]) then return {'expired'} end
redis.call('HSET', key, 'state', 'revoked', 'ended', ARGV[4])
redis.call('PEXPIRE', key, ARGV[5])
redis.call('PEXPIRE', prefix .. 'invtok:' .. inv[3], ARGV[5])
local pending = prefix .. 'invpending:' .. org
if redis.call('HGET', pending, inv[4]) == id then redis.call('HDEL', pending, inv[4]) end
return {'ok'}
"""


class Invitations:
    """The invitation store and its flows. ``issuer`` is the public URL the email links to."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        accounts: Accounts,
        mailer: Mailer,
        audit: AuditLog,
        issuer: str,
        settings: InvitationSettings | None = None,
        prefix: str = "opsmesh:id:",
    ) -> None:
        self._redis = client
        self._accounts = accounts
        self._memberships = accounts.memberships
        self._mailer = mailer
        self._audit = audit
        self._issuer = issuer.rstrip("/")
        self.settings = settings or InvitationSettings()
        self._prefix = prefix
        self._accept = client.register_script(_ACCEPT)
        self._create = client.register_script(_CREATE)
        self._resend = client.register_script(_RESEND)
        self._revoke = client.register_script(_REVOKE)

    def _key(self, invitation_id: str) -> str:
        return f"{self._prefix}inv:{invitation_id}"

    def _list_key(self, org_id: str) -> str:
        return f"{self._prefix}invs:{org_id}"

    # -- the admin's side (OrganizationService) ------------------------------------------

    async def invite(self, *, org_id: str, email: str, role: str, inviter: str) -> Invitation:
        """Sends the invitation email, then stores the invitation. AlreadyExists when the
        address is a member or has a pending invitation; nothing is stored when the email
        cannot be handed over (UNAVAILABLE)."""
        address = _parse_invited_email(email)
        role = parse_org_role(role)
        existing = await self._accounts.find_by_login(address)
        if existing is not None and org_id in existing.orgs:
            raise AlreadyExists(f"{address} is already a member", field="email")
        await self._refuse_pending(org_id, address)
        invitation_id = str(uuid.uuid4())
        token = secrets.token_urlsafe(32)
        now = time.time()
        expires = now + self.settings.ttl
        await self._send(
            org_id=org_id, to=address, role=role, inviter=inviter, token=token, expires=expires
        )
        with redis_errors():
            reply = await self._create(
                keys=[],
                args=[
                    self._prefix,
                    org_id,
                    invitation_id,
                    address,
                    address.casefold(),
                    role,
                    inviter,
                    int(now * 1000),
                    int(expires * 1000),
                    _digest(token),
                    int(KEPT_AFTER_END * 1000),
                ],
            )
        if _text(reply[0]) != "ok":  # another admin invited the address meanwhile
            raise AlreadyExists(f"{address} has a pending invitation; resend it", field="email")
        await self._audit.record(
            org_id,
            actor=inviter,
            action="invitation.sent",
            target=invitation_id,
            details={"email": address, "role": role},
        )
        return await self.get(org_id, invitation_id)

    async def _refuse_pending(self, org_id: str, address: str) -> None:
        with redis_errors():
            other = await self._redis.hget(f"{self._prefix}invpending:{org_id}", address.casefold())
        if other is None:
            return
        try:
            invitation = await self.get(org_id, _text(other))
        except NotFound:
            return
        if invitation.state == "pending":
            raise AlreadyExists(f"{address} has a pending invitation; resend it", field="email")

    async def resend(self, *, org_id: str, invitation_id: str, actor: str) -> Invitation:
        """A new link and expiry for a pending (or expired) invitation; the old link dies.
        If the email cannot be sent, nothing changes (the old link keeps working)."""
        invitation = await self.get(org_id, invitation_id)
        if invitation.state not in ("pending", "expired"):
            raise FailedPrecondition(f"the invitation is {invitation.state}, not pending")
        token = secrets.token_urlsafe(32)
        now = time.time()
        expires = now + self.settings.ttl
        await self._send(
            org_id=org_id,
            to=invitation.email,
            role=invitation.role,
            inviter=actor,
            token=token,
            expires=expires,
        )
        with redis_errors():
            reply = await self._resend(
                keys=[],
                args=[
                    self._prefix,
                    invitation_id,
                    org_id,
                    _digest(token),
                    int(now * 1000),
                    int(expires * 1000),
                    actor,
                    int(KEPT_AFTER_END * 1000),
                ],
            )
        self._refused(_text(reply[0]), invitation_id)
        await self._audit.record(
            org_id,
            actor=actor,
            action="invitation.resent",
            target=invitation_id,
            details={"email": invitation.email},
        )
        return await self.get(org_id, invitation_id)

    async def revoke(self, *, org_id: str, invitation_id: str, actor: str) -> Invitation:
        """Withdraws a pending invitation: its link answers ``revoked`` from now on."""
        with redis_errors():
            reply = await self._revoke(
                keys=[],
                args=[
                    self._prefix,
                    invitation_id,
                    org_id,
                    int(time.time() * 1000),
                    int(KEPT_AFTER_END * 1000),
                ],
            )
        self._refused(_text(reply[0]), invitation_id)
        invitation = await self.get(org_id, invitation_id)
        await self._audit.record(
            org_id,
            actor=actor,
            action="invitation.revoked",
            target=invitation_id,
            details={"email": invitation.email},
        )
        return invitation

    @staticmethod
    def _refused(outcome: str, invitation_id: str) -> None:
        if outcome == "missing":
            raise NotFound(f"no invitation {invitation_id}")
        if outcome != "ok":
            raise FailedPrecondition(f"the invitation is {outcome}, not pending")

    async def get(self, org_id: str, invitation_id: str) -> Invitation:
        """The invitation, NotFound if it does not exist in ``org_id`` (another org's too)."""
        with redis_errors():
            raw = await self._redis.hgetall(self._key(invitation_id))
        invitation = _invitation(invitation_id, raw)
        if invitation is None or invitation.org_id != org_id:
            raise NotFound(f"no invitation {invitation_id}")
        return invitation

    async def of_org(self, org_id: str) -> list[Invitation]:
        """The org's invitations still kept, newest first (ties by id)."""
        with redis_errors():
            listed = await self._redis.zrevrange(self._list_key(org_id), 0, -1)
            ids = [_text(i) for i in listed if isinstance(i, bytes | str)]
            async with self._redis.pipeline(transaction=False) as pipe:
                for invitation_id in ids:
                    pipe.hgetall(self._key(invitation_id))
                records = await pipe.execute() if ids else []
        found = []
        gone = []
        for invitation_id, raw in zip(ids, records, strict=True):
            invitation = _invitation(invitation_id, raw)
            if invitation is None:
                gone.append(invitation_id)
            else:
                found.append(invitation)
        if gone:  # ended long ago: the record expired, the list entry goes now
            with redis_errors():
                await self._redis.zrem(self._list_key(org_id), *gone)
        return sorted(found, key=lambda i: (i.created_at, i.invitation_id), reverse=True)

    async def _send(
        self, *, org_id: str, to: str, role: str, inviter: str, token: str, expires: float
    ) -> None:
        names = await self._memberships.org_names([org_id])
        with downstream_errors("notify"):
            await self._mailer.send_email(
                template=TEMPLATE,
                to=to,
                org_id=org_id,
                data={
                    "org_name": names[org_id],
                    "inviter_name": inviter,
                    "accept_url": f"{self._issuer}{ACCEPT_PATH}?token={token}",
                    "role": role,
                    "expires_at": _iso(expires),
                },
            )

    # -- the invitee's side (the acceptance page) ----------------------------------------

    async def preview(self, token: str) -> InvitationView:
        """What the page shows of the invitation behind ``token``; InvitationProblem when it
        cannot be accepted (expired, revoked, used, unknown)."""
        invitation_id = await self._look(token)
        with redis_errors():
            raw = await self._redis.hgetall(self._key(invitation_id))
        invitation = _invitation(invitation_id, raw)
        if invitation is None:  # expired between the two reads
            raise InvitationProblem("unknown")
        names = await self._memberships.org_names([invitation.org_id])
        account = await self._accounts.find_by_login(invitation.email)
        return InvitationView(
            invitation_id=invitation_id,
            org_id=invitation.org_id,
            org_name=names[invitation.org_id],
            role=invitation.role,
            email=invitation.email,
            inviter=invitation.invited_by,
            account_exists=account is not None,
            expires_at=invitation.expires_at,
        )

    async def accept_new_account(self, token: str, *, user_id: str, password: str) -> Membership:
        """Creates the invitee's account (user name ``user_id``, the invited email, the password
        policy applies) as a member with the invited role, and uses the invitation up; all in
        one step. AlreadyExists for a taken user name or email; InvitationProblem for a token
        that cannot be accepted (then no account is created)."""
        view = await self.preview(token)
        check_password(password, user_id=user_id.strip().lower(), email=view.email)
        new = await self._accounts.prepare(
            org_id=view.org_id,
            user_id=user_id,
            password=password,
            roles=view.role,
            email=view.email,
        )
        reply = await self._run_accept(token, "new", *self._accounts.creation_args(new))
        outcome = _text(reply[0])
        self._accounts.creation_refused(outcome, new.account)
        membership = self._accepted(reply, new.account.user_id)
        await self._audit.record(
            membership.org_id,
            actor=membership.user_id,
            action="invitation.accepted",
            target=view.invitation_id,
            details={"email": view.email, "role": view.role, "new_account": "true"},
        )
        return membership

    async def accept_existing(self, token: str, *, user_id: str) -> Membership:
        """Makes the existing account ``user_id`` (already signed in by the caller: this does
        not check a password) a member with the invited role and uses the invitation up.
        InvitationProblem ``foreign`` when the account's email is not the invited address;
        a user already in the org keeps their roles (the invitation is used up all the same)."""
        view = await self.preview(token)
        account = await self._accounts.find(user_id)
        if account is None or account.email.casefold() != view.email.casefold():
            raise InvitationProblem("foreign")
        reply = await self._run_accept(token, "existing", account.user_id)
        membership = self._accepted(reply, account.user_id)
        await self._audit.record(
            membership.org_id,
            actor=membership.user_id,
            action="invitation.accepted",
            target=view.invitation_id,
            details={
                "email": view.email,
                "role": view.role,
                "already_member": str(_text(reply[0]) == "member").lower(),
            },
        )
        return membership

    async def _look(self, token: str) -> str:
        """The id of the acceptable invitation behind ``token``, else InvitationProblem."""
        reply = await self._run_accept(token, "look")
        if _text(reply[0]) != "pending":
            raise InvitationProblem(_text(reply[0]))
        return _text(reply[1])

    async def _run_accept(self, token: str, mode: str, *more: str | int) -> list[bytes | str]:
        if not _TOKEN.fullmatch(token):
            raise InvitationProblem("unknown")
        with redis_errors():
            reply: list[bytes | str] = await self._accept(
                keys=[],
                args=[
                    self._prefix,
                    _digest(token),
                    int(time.time() * 1000),
                    mode,
                    int(KEPT_AFTER_END * 1000),
                    *more,
                ],
            )
        return reply

    @staticmethod
    def _accepted(reply: list[bytes | str], user_id: str) -> Membership:
        outcome = _text(reply[0])
        if outcome == "no_account":
            raise InvitationProblem("foreign")
        if outcome not in ("ok", "member"):
            raise InvitationProblem(outcome)
        return Membership(
            org_id=_text(reply[2]),
            user_id=user_id,
            roles=split_roles(reply[3]),
            joined_at=time.time(),
        )


def _parse_invited_email(email: str) -> str:
    """The address as accounts store it (the same validation, so the invitee's account can
    carry it), or INVALID_ARGUMENT naming the field."""
    try:
        address = parse_email(email)
    except InvalidArgument as invalid:
        raise InvalidArgument(invalid.message, field="email") from None
    if not address:
        raise InvalidArgument("email is required", field="email")
    return address


def _invitation(invitation_id: str, raw: dict[bytes | str, bytes | str]) -> Invitation | None:
    data = {_text(k): _text(v) for k, v in raw.items()}
    if "org" not in data:
        return None
    expires = int(data["expires"]) / 1000
    state = data["state"]
    if state == "pending" and expires <= time.time():
        state = "expired"
    ended = int(data.get("ended") or 0)
    return Invitation(
        invitation_id=invitation_id,
        org_id=data["org"],
        email=data["email"],
        role=data["role"],
        invited_by=data["invited_by"],
        state=state,
        created_at=int(data["created"]) / 1000,
        expires_at=expires,
        sends=int(data.get("sends") or 1),
        accepted_by=data.get("accepted_by", ""),
        ended_at=ended / 1000 if ended else None,
    )
