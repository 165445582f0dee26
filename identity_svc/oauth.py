"""OAuth 2.1 for public clients: authorization codes with PKCE (S256 only) and rotating
refresh tokens whose reuse revokes the whole family (RFC 9700 §4.14.2).

Codes and refresh tokens are opaque random strings stored only as SHA-256 hashes.
A code is single use; presenting it again revokes the family it started. A refresh
token is issued only when the granted scope includes ``offline_access``. Each refresh
(one atomic Lua script) returns a new pair; the spent token may be presented once
more within ``reuse_grace`` and is then answered with the very same successor (a lost
response is retryable, nothing more); any other reuse revokes the family. A family
(the ``sid`` claim of its access tokens) lives at most ``refresh_absolute``; each
refresh token at most ``refresh_idle``; every key written has a TTL.

Revoking a family also publishes it on the revocation feed (mesh/revocations.py) in the same
Lua script, so no revocation is recorded without being published; the feed, not these keys,
is what other services read.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from cryptography.fernet import Fernet, InvalidToken
from redis.asyncio.client import Pipeline
from redis.exceptions import WatchError

from identity_svc.accounts import Account
from identity_svc.keys import KeyRing, issue_access_token
from identity_svc.organizations import Memberships, split_roles
from mesh.auth import AuthSettings
from mesh.context import Principal
from mesh.redisconn import redis_errors
from mesh.revocations import FEED_KEY_PREFIX, feed_key, feed_ttl_ms
from mesh.settings import seconds, setting

SUPPORTED_SCOPES = ("openid", "offline_access")
"""What a client may ask for; ``offline_access`` is what earns a refresh token."""

# Rotates a refresh token. A spent token is answered once more, within the grace and while
# its successor is still unused, with that same successor (sealed so that only the holder
# of the spent token can open it): a response lost on the way is retryable. Any other
# presentation of a spent token is theft or a broken client, and revokes the family (and
# publishes it on the revocation feed: ARGV[8] its key prefix, ARGV[9] its TTL in ms).
_REFRESH = """
local token = redis.call('HGETALL', KEYS[1])
if #token == 0 then return {'invalid'} end
local t = {}
for i = 1, #token, 2 do t[token[i]] = token[i + 1] end
local family = ARGV[1] .. 'fam:' .. t.family
if redis.call('EXISTS', family) == 0 then return {'invalid'} end
if redis.call('HGET', family, 'client') ~= ARGV[6] then return {'invalid'} end
if redis.call('HGET', family, 'revoked') == '1' then return {'revoked'} end
local f = redis.call('HMGET', family, 'user', 'org', 'roles', 'scope', 'current')
-- A session lives only while its user belongs to its organization (removal revokes it too,
-- this is the belt to those braces), and carries the roles the membership has now.
local member = redis.call('HGET', ARGV[1] .. 'orgs:' .. f[1], f[2])
if not member then
  redis.call('HSET', family, 'revoked', '1')
  redis.call('SET', ARGV[8] .. t.family, '1', 'PX', ARGV[9])
  return {'revoked'}
end
if member ~= f[3] then
  redis.call('HSET', family, 'roles', member)
  f[3] = member
end
local now = tonumber(ARGV[2])
local used = tonumber(t.used_at or '0')
if used > 0 then
  local successor_used = redis.call('HGET', ARGV[1] .. 'rt:' .. t.successor, 'used_at')
  if t.graced ~= '1' and now - used <= tonumber(ARGV[3]) and f[5] == t.successor
      and successor_used == '0' then
    redis.call('HSET', KEYS[1], 'graced', '1')
    return {'grace', t.family, f[1], f[2], f[3], f[4] or '', t.sealed}
  end
  redis.call('HSET', family, 'revoked', '1')
  redis.call('SET', ARGV[8] .. t.family, '1', 'PX', ARGV[9])
  return {'reused', t.family}
end
redis.call('HSET', KEYS[1], 'used_at', now, 'successor', ARGV[4], 'sealed', ARGV[7])
local fresh = ARGV[1] .. 'rt:' .. ARGV[4]
redis.call('HSET', fresh, 'family', t.family, 'used_at', 0, 'successor', '')
local ttl = math.min(tonumber(ARGV[5]), redis.call('PTTL', family))
redis.call('PEXPIRE', fresh, ttl)
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('HSET', family, 'current', ARGV[4])
return {'ok', t.family, f[1], f[2], f[3], f[4] or ''}
"""

# Takes a code once; a second presentation finds the tombstone and revokes what it issued
# (if it issued anything: a failed exchange left no family, and none is created here).
# ARGV[4], ARGV[5]: the revocation feed's key prefix and TTL (ms).
_TAKE_CODE = """
local code = redis.call('GETDEL', KEYS[1])
if code then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
  return {'ok', code}
end
local family = redis.call('GET', KEYS[2])
if family then
  local key = ARGV[3] .. 'fam:' .. family
  if redis.call('EXISTS', key) == 1 then redis.call('HSET', key, 'revoked', '1') end
  -- Published even before the family exists: a replay racing the first exchange still
  -- ends the access tokens that exchange is about to issue.
  redis.call('SET', ARGV[4] .. family, '1', 'PX', ARGV[5])
  return {'replayed', family}
end
return {'invalid'}
"""

# Revokes an existing family and publishes it on the revocation feed (KEYS[2], for ARGV[1]
# ms); an unknown family is left unwritten (every key has a TTL).
_REVOKE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'revoked', '1')
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[1])
end
return 0
"""

# Revokes every live family of one user (KEYS[1]: the user's family index), or of one of
# their organizations (ARGV[4], empty: all), publishing each on the revocation feed (ARGV[2],
# for ARGV[3] ms) in the same step; families that expired leave the index. Replies the count.
_REVOKE_USER = """
local revoked = 0
for _, family in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = ARGV[1] .. 'fam:' .. family
  local record = redis.call('HMGET', key, 'org', 'revoked')
  if not record[1] then
    redis.call('SREM', KEYS[1], family)
  elseif ARGV[4] == '' or record[1] == ARGV[4] then
    if record[2] ~= '1' then
      redis.call('HSET', key, 'revoked', '1')
      revoked = revoked + 1
    end
    redis.call('SET', ARGV[2] .. family, '1', 'PX', ARGV[3])
  end
end
return revoked
"""


@dataclass(frozen=True, kw_only=True, slots=True)
class _Rotated:
    """A rotated refresh token: the token response and the session it belongs to."""

    tokens: dict[str, Any]
    family: str
    user: str
    org_id: str


class OAuthError(Exception):
    """An OAuth error response: ``error`` code, description, HTTP status."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status


def _public_clients(raw: str) -> dict[str, tuple[str, ...]]:
    clients: dict[str, tuple[str, ...]] = {}
    for entry in raw.split(";"):
        client_id, _, uris = entry.partition("=")
        listed = tuple(u.strip() for u in uris.split(",") if u.strip())
        if not client_id.strip() or not listed:
            raise ValueError("expected client=uri[,uri][;client=uri]")
        clients[client_id.strip()] = listed
    return clients


def _service_clients(raw: str) -> dict[str, str]:
    services: dict[str, str] = {}
    for entry in filter(None, (e.strip() for e in raw.split(";"))):
        client_id, _, secret = entry.partition("=")
        if not client_id or len(secret) < 16:
            raise ValueError("expected client=secret (16+ characters)[;...]")
        services[client_id] = _digest(secret)
    return services


def _no_clients() -> dict[str, Any]:
    return {}


@dataclass(frozen=True, kw_only=True)
class OAuthSettings:
    clients: Mapping[str, tuple[str, ...]] = setting(
        "OPSMESH_OAUTH_CLIENTS",
        {},
        _public_clients,
        default_factory=_no_clients,
        doc="client=uri[,uri][;client=uri]; none: a redirect URI is the deployment's own",
    )
    """Public clients and their exact redirect URIs."""
    service_clients: Mapping[str, str] = setting(
        "OPSMESH_SERVICE_CLIENTS",
        {},
        _service_clients,
        default_factory=_no_clients,
        doc="client=secret[;client=secret]",
        secret=True,
    )
    """Confidential service clients: client id -> SHA-256 (hex) of its secret."""
    code_ttl: float = seconds("OPSMESH_OAUTH_CODE_TTL", 60.0, minimum=5, maximum=600)
    refresh_idle: float = seconds(
        "OPSMESH_REFRESH_IDLE", 7 * 86400.0, minimum=60, maximum=365 * 86400
    )
    refresh_absolute: float = seconds(
        "OPSMESH_REFRESH_ABSOLUTE", 30 * 86400.0, minimum=60, maximum=365 * 86400
    )
    reuse_grace: float = seconds("OPSMESH_REFRESH_REUSE_GRACE", 2.0, minimum=0, maximum=60)


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def granted_scope(requested: str) -> str:
    """The scope a request may be granted (each supported scope once, in the request's order),
    or OAuthError ``invalid_scope`` for one the server does not support."""
    scopes = list(dict.fromkeys(requested.split()))
    unknown = [scope for scope in scopes if scope not in SUPPORTED_SCOPES]
    if unknown:
        raise OAuthError("invalid_scope", f"unsupported scope {unknown[0][:40]!r}")
    return " ".join(scopes)


def _sealer(spent_token: str) -> Fernet:
    """Seals a successor with a key only the holder of the spent token can derive (Redis
    keeps the spent token's SHA-256, which is not this key)."""
    key = hashlib.sha256(b"opsmesh-successor\0" + spent_token.encode()).digest()
    return Fernet(base64.urlsafe_b64encode(key))


def s256(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")


class OAuthServer:
    def __init__(
        self,
        client: aioredis.Redis,
        *,
        ring: KeyRing,
        auth: AuthSettings,
        access_ttl: float,
        settings: OAuthSettings,
        prefix: str = "opsmesh:id:",
    ) -> None:
        self._redis = client
        self._ring = ring
        self._auth = auth
        self._access_ttl = access_ttl
        # A revocation stays on the feed until the session's last access token expired.
        self._feed_ttl_ms = feed_ttl_ms(access_ttl)
        self.settings = settings
        self._prefix = prefix
        self._refresh = client.register_script(_REFRESH)
        self._take_code = client.register_script(_TAKE_CODE)
        self._revoke = client.register_script(_REVOKE)
        self._revoke_user = client.register_script(_REVOKE_USER)
        self._memberships = Memberships(client, prefix=prefix)

    def check_client(self, client_id: str, redirect_uri: str) -> None:
        allowed = self.settings.clients.get(client_id)
        if allowed is None:
            raise OAuthError("invalid_client", f"unknown client {client_id[:60]!r}", 401)
        if redirect_uri not in allowed:  # exact match, no prefixes or patterns
            raise OAuthError("invalid_request", "redirect_uri is not registered for this client")

    async def issue_code(
        self,
        account: Account,
        *,
        client_id: str,
        redirect_uri: str,
        challenge: str,
        scope: str,
        nonce: str = "",
    ) -> str:
        code = secrets.token_urlsafe(32)
        record = json.dumps(
            {
                "user": account.user_id,
                "org": account.org_id,
                "roles": sorted(account.roles),
                "client": client_id,
                "redirect": redirect_uri,
                "challenge": challenge,
                "scope": granted_scope(scope),
                "nonce": nonce,
                "auth_time": int(time.time()),
            }
        )
        with redis_errors():
            await self._redis.set(
                f"{self._prefix}code:{_digest(code)}", record, px=int(self.settings.code_ttl * 1000)
            )
        return code

    def _access(self, principal: Principal, family: str) -> dict[str, Any]:
        token = issue_access_token(
            self._ring,
            principal,
            issuer=self._auth.issuer,
            audience=self._auth.audience,
            ttl=self._access_ttl,
            extra={"sid": family} if family else None,
        )
        return {"access_token": token, "token_type": "Bearer", "expires_in": int(self._access_ttl)}

    async def exchange_code(
        self, *, code: str, client_id: str, redirect_uri: str, verifier: str
    ) -> dict[str, Any]:
        family = str(uuid.uuid4())
        digest = _digest(code)
        with redis_errors():
            outcome = await self._take_code(
                keys=[f"{self._prefix}code:{digest}", f"{self._prefix}codeused:{digest}"],
                args=[
                    family,
                    int(self.settings.refresh_absolute * 1000),
                    self._prefix,
                    FEED_KEY_PREFIX,
                    self._feed_ttl_ms,
                ],
            )
        if outcome[0] == b"replayed":
            raise OAuthError(
                "invalid_grant", "authorization code already used; its tokens are revoked"
            )
        if outcome[0] != b"ok":
            raise OAuthError("invalid_grant", "unknown or expired authorization code")
        record = json.loads(outcome[1])
        if record["client"] != client_id or record["redirect"] != redirect_uri:
            await self.revoke_family(family)
            raise OAuthError(
                "invalid_grant", "the code was issued to another client or redirect_uri"
            )
        if not verifier or not 43 <= len(verifier) <= 128:
            raise OAuthError("invalid_grant", "code_verifier is missing or not 43-128 characters")
        if not secrets.compare_digest(s256(verifier), record["challenge"]):
            raise OAuthError("invalid_grant", "code_verifier does not match the code_challenge")
        principal = Principal(record["user"], record["org"], frozenset(record["roles"]))
        offline = "offline_access" in record["scope"].split()
        refresh = secrets.token_urlsafe(32) if offline else ""
        principal = await self._start_family(family, principal, client_id, record["scope"], refresh)
        record["roles"] = sorted(principal.roles)
        body = {**self._access(principal, family), "scope": record["scope"]}
        if refresh:  # only a client granted offline_access keeps a session without the user
            body["refresh_token"] = refresh
        if "openid" in record["scope"].split():
            body["id_token"] = self._id_token(record, client_id, family)
        return body

    async def _start_family(
        self, family: str, principal: Principal, client_id: str, scope: str, refresh: str
    ) -> Principal:
        """The family record (the ``sid`` of its access tokens) and its first refresh token,
        only while the user belongs to the principal's organization (checked in the same
        transaction: a removal cannot slip between the check and the family, which would
        miss the removal's revocation). Returns the principal with its current roles."""
        members_of = self._memberships.orgs_key(principal.user_id)
        with redis_errors():
            async with self._redis.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        await pipe.watch(members_of)
                        roles = await pipe.hget(members_of, principal.org_id)
                        if roles is None:
                            raise OAuthError(
                                "invalid_grant", "the user is not a member of the organization"
                            )
                        principal = Principal(
                            principal.user_id, principal.org_id, split_roles(roles)
                        )
                        pipe.multi()  # type: ignore[no-untyped-call]
                        self._write_family(pipe, family, principal, client_id, scope, refresh)
                        await pipe.execute()
                        return principal
                    except WatchError:
                        continue

    def _write_family(
        self,
        pipe: Pipeline,
        family: str,
        principal: Principal,
        client_id: str,
        scope: str,
        refresh: str,
    ) -> None:
        family_key = f"{self._prefix}fam:{family}"
        pipe.hset(
            family_key,
            mapping={
                "user": principal.user_id,
                "org": principal.org_id,
                "roles": ",".join(sorted(principal.roles)),
                "client": client_id,
                "scope": scope,
                "current": _digest(refresh) if refresh else "",
                "created": int(time.time() * 1000),
                "revoked": "0",
            },
        )
        pipe.pexpire(family_key, int(self.settings.refresh_absolute * 1000))
        # Every family of a user, to end them all (password reset, member removal).
        pipe.sadd(self._user_families_key(principal.user_id), family)
        pipe.pexpire(
            self._user_families_key(principal.user_id),
            int(self.settings.refresh_absolute * 1000),
        )
        if refresh:
            token_key = f"{self._prefix}rt:{_digest(refresh)}"
            pipe.hset(token_key, mapping={"family": family, "used_at": 0, "successor": ""})
            pipe.pexpire(token_key, int(self.settings.refresh_idle * 1000))

    def _id_token(self, record: Mapping[str, Any], client_id: str, family: str) -> str:
        """An OpenID Connect ID token: who signed in, for the client (its ``aud``), echoing the
        client's ``nonce``. It is no access token: services only accept their own audience."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self._auth.issuer,
            "sub": record["user"],
            "aud": client_id,
            "azp": client_id,
            "iat": now,
            "exp": now + int(self._access_ttl),
            "auth_time": record.get("auth_time", now),
            "sid": family,
            "preferred_username": record["user"],
            "org_id": record["org"],
            "roles": record["roles"],
        }
        if record.get("nonce"):
            claims["nonce"] = record["nonce"]
        return self._ring.sign(claims)

    async def refresh(
        self, *, refresh_token: str, client_id: str, org_id: str = ""
    ) -> dict[str, Any]:
        """Rotates ``refresh_token``. With ``org_id`` naming another organization of the user
        (switching organization), the session moves there: a new family in that org (new
        refresh token and ``sid``) replaces the old one, which is revoked; no password is
        asked, and an org the user does not belong to is refused before anything is spent."""
        if org_id:
            await self._check_switch(refresh_token, org_id)
        rotated = await self._rotate(refresh_token=refresh_token, client_id=client_id)
        if not org_id or rotated.org_id == org_id:
            return rotated.tokens
        family = str(uuid.uuid4())
        principal = Principal(rotated.user, org_id)
        scope = str(rotated.tokens["scope"])
        offline = "offline_access" in scope.split()
        refresh = secrets.token_urlsafe(32) if offline else ""
        principal = await self._start_family(family, principal, client_id, scope, refresh)
        await self.revoke_family(rotated.family)
        tokens = {**self._access(principal, family), "scope": scope}
        if refresh:
            tokens["refresh_token"] = refresh
        return tokens

    async def _check_switch(self, refresh_token: str, org_id: str) -> None:
        """invalid_request unless the refresh token's user belongs to ``org_id`` (read
        before the token is spent, so a refused switch leaves the session as it was)."""
        with redis_errors():
            family = await self._redis.hget(f"{self._prefix}rt:{_digest(refresh_token)}", "family")
            user = None
            if family is not None:
                user = await self._redis.hget(f"{self._prefix}fam:{_text(family)}", "user")
        if user is None:
            raise OAuthError("invalid_grant", "unknown or expired refresh token")
        if await self._memberships.get(org_id[:128], _text(user)) is None:
            raise OAuthError("invalid_request", "the user is not a member of that organization")

    async def _rotate(self, *, refresh_token: str, client_id: str) -> _Rotated:
        fresh = secrets.token_urlsafe(32)
        sealed = _sealer(refresh_token).encrypt(fresh.encode()).decode()
        with redis_errors():
            outcome = await self._refresh(
                keys=[f"{self._prefix}rt:{_digest(refresh_token)}"],
                args=[
                    self._prefix,
                    int(time.time() * 1000),
                    int(self.settings.reuse_grace * 1000),
                    _digest(fresh),
                    int(self.settings.refresh_idle * 1000),
                    client_id,
                    sealed,
                    FEED_KEY_PREFIX,
                    self._feed_ttl_ms,
                ],
            )
        parts = [part.decode() if isinstance(part, bytes) else str(part) for part in outcome]
        if parts[0] == "reused":
            raise OAuthError("invalid_grant", "refresh token reused: the session is revoked")
        if parts[0] == "revoked":
            raise OAuthError("invalid_grant", "the session was revoked")
        if parts[0] == "grace":
            fresh = self._unseal(refresh_token, parts[6] if len(parts) > 6 else "")
        elif parts[0] != "ok":
            raise OAuthError("invalid_grant", "unknown or expired refresh token")
        family, user, org, roles, scope = parts[1:6]
        principal = Principal(user, org, frozenset(r for r in roles.split(",") if r))
        tokens = {**self._access(principal, family), "refresh_token": fresh, "scope": scope}
        return _Rotated(tokens=tokens, family=family, user=user, org_id=org)

    @staticmethod
    def _unseal(spent_token: str, sealed: str) -> str:
        try:
            return _sealer(spent_token).decrypt(sealed.encode()).decode()
        except InvalidToken:  # a record from before sealing: no successor to hand out again
            raise OAuthError("invalid_grant", "refresh token already used") from None

    def client_credentials(self, *, client_id: str, secret: str) -> dict[str, Any]:
        """A service's own access token: it may act for any organization, naming it per call."""
        expected = self.settings.service_clients.get(client_id)
        if expected is None or not secrets.compare_digest(expected, _digest(secret)):
            raise OAuthError("invalid_client", "unknown service client or wrong secret", 401)
        principal = Principal(f"service:{client_id}", "*", frozenset({"service"}))
        return self._access(principal, "")

    def _user_families_key(self, user_id: str) -> str:
        return f"{self._prefix}userfam:{user_id}"

    async def revoke_user_families(self, user_id: str, org_id: str | None = None) -> int:
        """Revokes every session (refresh-token family) of ``user_id``, or only those in
        ``org_id``, and publishes them on the revocation feed; returns how many were live."""
        with redis_errors():
            revoked = await self._revoke_user(
                keys=[self._user_families_key(user_id)],
                args=[self._prefix, FEED_KEY_PREFIX, self._feed_ttl_ms, org_id or ""],
            )
        return int(revoked)

    async def revoke_family(self, family: str) -> None:
        with redis_errors():
            await self._revoke(
                keys=[f"{self._prefix}fam:{family}", feed_key(family)], args=[self._feed_ttl_ms]
            )

    async def revoke(self, token: str) -> None:
        """Revokes the family of a refresh token (RFC 7009: unknown tokens are no error)."""
        with redis_errors():
            family = await self._redis.hget(f"{self._prefix}rt:{_digest(token)}", "family")
        if family is not None:
            await self.revoke_family(family.decode() if isinstance(family, bytes) else family)
