"""Verifying JWT access tokens: what every service needs, and nothing of the issuer's.

Verification accepts ES256 only (no ``none``, no HMAC with a public key as
secret), needs a known ``kid`` from the issuer's JWKS (an unknown one refreshes
the key set once), checks signature, ``iss``, ``aud``, ``exp``, ``nbf`` and
``iat`` with a small leeway, and asks the revocation feed (mesh/revocations.py)
whether the token's session was revoked. Signing keys and issuing live in the
identity service (identity_svc/keys.py).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import httpx
import jwt

from mesh.context import Principal, parse_identifier
from mesh.errors import Unauthenticated
from opsmesh.errors.v1 import errors_pb2
from opsmesh.errors.v1.errors_pb2 import ErrorReason

ALGORITHM = "ES256"
AUTHORIZATION_HEADER = "authorization"


class KeySource(Protocol):
    """Public keys by kid; ``refresh`` asks the source again (for an unknown kid)."""

    async def key(self, kid: str, *, refresh: bool) -> Any: ...


class RemoteJwks:
    """A JWKS over HTTP, cached; refreshed on an unknown kid at most every ``min_refresh`` s."""

    def __init__(
        self, url: str, *, cache_seconds: float = 300.0, min_refresh: float = 10.0
    ) -> None:
        self._url = url
        self._cache_seconds = cache_seconds
        self._min_refresh = min_refresh
        self._keys: dict[str, Any] = {}
        self._fetched = 0.0
        self._lock = asyncio.Lock()
        self._http = httpx.AsyncClient(timeout=5.0)

    async def _fetch(self) -> None:
        response = await self._http.get(self._url)
        response.raise_for_status()
        keys = {}
        for entry in response.json().get("keys", []):
            if entry.get("kty") == "EC" and entry.get("alg", ALGORITHM) == ALGORITHM:
                keys[entry["kid"]] = jwt.algorithms.ECAlgorithm.from_jwk(json.dumps(entry))
        self._keys = keys
        self._fetched = time.monotonic()

    async def key(self, kid: str, *, refresh: bool) -> Any:
        async with self._lock:
            age = time.monotonic() - self._fetched
            stale = age > self._cache_seconds
            if stale or (refresh and kid not in self._keys and age > self._min_refresh):
                try:
                    await self._fetch()
                except (httpx.HTTPError, ValueError) as error:
                    if not self._keys:
                        raise Unauthenticated(
                            f"cannot verify tokens: the key set at {self._url} is unreachable",
                            reason=errors_pb2.ERROR_REASON_JWKS_UNAVAILABLE,
                        ) from error
            return self._keys.get(kid)

    async def close(self) -> None:
        await self._http.aclose()


def _refuse(
    message: str, reason: ErrorReason = errors_pb2.ERROR_REASON_INVALID_TOKEN
) -> Unauthenticated:
    return Unauthenticated(message, reason=reason)


class JwtAuthenticator:
    """Verifies ``authorization: Bearer <JWT>`` and yields the caller's principal."""

    def __init__(
        self,
        *,
        keys: KeySource,
        issuer: str,
        audience: str,
        leeway: float = 30.0,
        revoked: Callable[[Mapping[str, Any]], Awaitable[bool]] | None = None,
    ) -> None:
        self._keys = keys
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway
        self._revoked = revoked

    async def authenticate(self, metadata: Mapping[str, str], method: str) -> Principal:
        header = metadata.get(AUTHORIZATION_HEADER, "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise _refuse(
                "missing bearer token in the authorization metadata",
                errors_pb2.ERROR_REASON_MISSING_CREDENTIALS,
            )
        try:
            unverified = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise _refuse("malformed token") from None
        if unverified.get("alg") != ALGORITHM:
            raise _refuse(f"token algorithm {unverified.get('alg')!r} is not accepted")
        kid = unverified.get("kid")
        if not isinstance(kid, str) or not kid:
            raise _refuse("token has no key id")
        key = await self._keys.key(kid, refresh=False) or await self._keys.key(kid, refresh=True)
        if key is None:
            raise _refuse(f"token signed with an unknown key {kid[:40]!r}")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": ["exp", "iat", "nbf", "iss", "aud", "sub", "jti"]},
            )
        except jwt.ExpiredSignatureError:
            raise _refuse("token expired", errors_pb2.ERROR_REASON_TOKEN_EXPIRED) from None
        except jwt.ImmatureSignatureError:
            raise _refuse("token not valid yet") from None
        except jwt.InvalidTokenError as error:
            raise _refuse(f"token rejected: {error}") from None
        org = claims.get("org_id")
        roles = claims.get("roles", [])
        if not isinstance(org, str) or not org or not isinstance(roles, list):
            raise _refuse("token lacks org_id or roles")
        if self._revoked is not None and await self._revoked(claims):
            raise _refuse("token was revoked", errors_pb2.ERROR_REASON_TOKEN_REVOKED)
        principal = Principal(
            user_id=str(claims["sub"]), org_id=org, roles=frozenset(str(r) for r in roles)
        )
        if org == "*" and "service" in principal.roles:
            return _acting_for(principal, metadata)
        return principal


ACT_AS_USER_HEADER = "x-opsmesh-act-as-user"
ACT_AS_ORG_HEADER = "x-opsmesh-act-as-org"


def _acting_for(service: Principal, metadata: Mapping[str, str]) -> Principal:
    """A service token acts for the organization (and user) each call names; a user's never."""
    org = metadata.get(ACT_AS_ORG_HEADER)
    if not org:
        raise _refuse(f"a service token must name the org it acts for ({ACT_AS_ORG_HEADER})")
    try:
        return Principal(
            user_id=parse_identifier(
                metadata.get(ACT_AS_USER_HEADER) or service.user_id.split(":")[-1], "acting user"
            ),
            org_id=parse_identifier(org, "acting org"),
            roles=frozenset({"service"}),
        )
    except Unauthenticated as error:
        raise _refuse(error.message) from None
