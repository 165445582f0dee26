"""Password reset links: single use, 30 minutes, stored only as SHA-256 hashes.

A link's record lives in identity's Redis under ``reset:<sha256(token)>`` (user, expiry,
state); the account's newest link is ``resetuser:<user>``, so asking again retires the
previous link (``replaced``) and one account has at most one live link. The record is
kept a day past its expiry with its state, so that the page can say *why* a link no
longer works (expired, already used, replaced) instead of a bare "invalid"; after that,
and for a token never issued, it is ``unknown``. Using a link is one Lua script: it
checks and marks the record used atomically, so two submissions of one link set one
password.

Requests are throttled with the sign-in machinery (identity_svc/accounts.py): per account
and per client address, counted before anything is looked up or sent, the same way for
accounts that exist and for those that do not.
"""

from __future__ import annotations

import enum
import hashlib
import secrets
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from mesh.errors import ResourceExhausted
from mesh.redisconn import redis_errors
from mesh.settings import integer, seconds

# KEYS[1]: the new link's record, KEYS[2]: the account's newest-link pointer.
# ARGV: user, expiry (ms since epoch), record TTL (ms), the new link's digest, the prefix.
# The previous link (if still active) is marked replaced: one live link per account.
_ISSUE = """
local previous = redis.call('GET', KEYS[2])
if previous then
  local old = ARGV[5] .. 'reset:' .. previous
  if redis.call('HGET', old, 'state') == 'active' then
    redis.call('HSET', old, 'state', 'replaced')
  end
end
redis.call('HSET', KEYS[1], 'user', ARGV[1], 'expires', ARGV[2], 'state', 'active')
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[3])
return 0
"""
# KEYS[1]: the link's record; ARGV[1]: now (ms); ARGV[2]: '1' to use it, '0' to look only.
# Replies {state, user}: 'active' (and, when used, now 'used'), 'used', 'replaced',
# 'expired' or 'unknown'.
_TAKE = """
local record = redis.call('HMGET', KEYS[1], 'user', 'expires', 'state')
if not record[1] then return {'unknown', ''} end
if record[3] ~= 'active' then return {record[3], record[1]} end
if tonumber(record[2]) <= tonumber(ARGV[1]) then return {'expired', record[1]} end
if ARGV[2] == '1' then redis.call('HSET', KEYS[1], 'state', 'used', 'used_at', ARGV[1]) end
return {'active', record[1]}
"""
_KEPT_AFTER_EXPIRY_MS = 86_400_000
"""How long a spent or expired link's record stays, so its page can say what happened."""


@dataclass(frozen=True, kw_only=True)
class ResetSettings:
    link_ttl: float = seconds("OPSMESH_PASSWORD_RESET_TTL", 1800.0, minimum=60, maximum=86400)
    """How long a reset link works."""
    window: float = seconds("OPSMESH_PASSWORD_RESET_WINDOW", 3600.0, minimum=1, maximum=86400)
    """The window of the request limits below."""
    max_per_account: int = integer(
        "OPSMESH_PASSWORD_RESET_MAX_PER_ACCOUNT", 3, minimum=1, maximum=1000
    )
    """Reset requests per account (or per unknown name asked for) within the window."""
    max_per_address: int = integer(
        "OPSMESH_PASSWORD_RESET_MAX_PER_ADDRESS", 10, minimum=1, maximum=100_000
    )
    """Reset requests per client address (an IPv6 /64) within the window."""


class LinkState(enum.Enum):
    ACTIVE = "active"
    USED = "used"
    REPLACED = "replaced"
    EXPIRED = "expired"
    UNKNOWN = "unknown"


class ResetLinkRefused(Exception):
    """The link cannot set a password; ``state`` says why (never ACTIVE)."""

    def __init__(self, state: LinkState) -> None:
        super().__init__(state.value)
        self.state = state


class ResetThrottled(ResourceExhausted):
    """Too many reset requests for this account or from this address."""


def link_digest(token: str) -> str:
    """What Redis keeps of a link's token (the token itself is only in the email)."""
    return hashlib.sha256(token.encode()).hexdigest()


class ResetLinks:
    """Issues, checks and uses password reset links."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        settings: ResetSettings | None = None,
        prefix: str = "opsmesh:id:",
    ) -> None:
        self._redis = client
        self.settings = settings or ResetSettings()
        self._prefix = prefix
        self._issue = client.register_script(_ISSUE)
        self._take = client.register_script(_TAKE)

    def request_counters(self, login: str, address_key: str) -> tuple[list[str], list[int]]:
        """What a reset request takes before it is answered, and the limits: per name asked
        for (user name or email, as typed, case-folded) and per client address
        (``accounts.address_key``). Nothing here depends on whether the account exists."""
        keys = [
            f"{self._prefix}resetreq:l:{login.strip().casefold()[:254]}",
            f"{self._prefix}resetreq:a:{address_key}",
        ]
        return keys, [self.settings.max_per_account, self.settings.max_per_address]

    def account_counter(self, user_id: str) -> tuple[list[str], list[int]]:
        """The account's own budget, taken after the answer (the user name and the email
        address of one account share it)."""
        return [f"{self._prefix}resetreq:u:{user_id}"], [self.settings.max_per_account]

    async def issue(self, user_id: str) -> str:
        """A new link token for ``user_id``; the account's previous link stops working."""
        token = secrets.token_urlsafe(32)
        digest = link_digest(token)
        now_ms = int(time.time() * 1000)
        ttl_ms = int(self.settings.link_ttl * 1000)
        with redis_errors():
            await self._issue(
                keys=[f"{self._prefix}reset:{digest}", f"{self._prefix}resetuser:{user_id}"],
                args=[
                    user_id,
                    now_ms + ttl_ms,
                    ttl_ms + _KEPT_AFTER_EXPIRY_MS,
                    digest,
                    self._prefix,
                ],
            )
        return token

    async def check(self, token: str) -> str:
        """The user a live link resets, without using it; ResetLinkRefused if it is not live."""
        return await self._run(token, use=False)

    async def use(self, token: str) -> str:
        """Uses the link (once, atomically) and returns its user; ResetLinkRefused if not live."""
        return await self._run(token, use=True)

    async def _run(self, token: str, *, use: bool) -> str:
        if not token or len(token) > 128:
            raise ResetLinkRefused(LinkState.UNKNOWN)
        with redis_errors():
            state, user = await self._take(
                keys=[f"{self._prefix}reset:{link_digest(token)}"],
                args=[int(time.time() * 1000), "1" if use else "0"],
            )
        outcome = LinkState(state.decode() if isinstance(state, bytes) else str(state))
        if outcome is not LinkState.ACTIVE:
            raise ResetLinkRefused(outcome)
        return user.decode() if isinstance(user, bytes) else str(user)
