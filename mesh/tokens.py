"""JWT access tokens: ES256 signing keys with rotation, issuing, and verification.

Keys live in a directory as ``<kid>.pem`` (private, mode 0600); the newest signs,
every key stays published in the JWKS until it is pruned, so tokens signed
before a rotation verify until they expire. Verification accepts ES256 only (no
``none``, no HMAC with a public key as secret), needs a known ``kid`` (an unknown
one refreshes the key set once), checks signature, ``iss``, ``aud``, ``exp``,
``nbf`` and ``iat`` with a small leeway, and asks whether the token was revoked.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mesh.context import Principal, parse_identifier
from mesh.errors import Unauthenticated
from opsmesh.errors.v1 import errors_pb2
from opsmesh.errors.v1.errors_pb2 import ErrorReason

ALGORITHM = "ES256"
AUTHORIZATION_HEADER = "authorization"


def _b64(value: int) -> str:
    return base64.urlsafe_b64encode(value.to_bytes(32, "big")).decode().rstrip("=")


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private_key: ec.EllipticCurvePrivateKey
    created: float

    def jwk(self) -> dict[str, str]:
        numbers = self.private_key.public_key().public_numbers()
        return {
            "kty": "EC",
            "crv": "P-256",
            "x": _b64(numbers.x),
            "y": _b64(numbers.y),
            "kid": self.kid,
            "use": "sig",
            "alg": ALGORITHM,
        }


class KeyRing:
    """ES256 keys in a directory; the newest signs, all are published."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.keys: list[SigningKey] = []
        self.reload()

    def reload(self) -> None:
        keys = []
        for path in sorted(self.directory.glob("*.pem")):
            private = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(private, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{path} is not an EC private key")
            keys.append(
                SigningKey(kid=path.stem, private_key=private, created=path.stat().st_mtime)
            )
        self.keys = sorted(keys, key=lambda k: (k.created, k.kid))

    @classmethod
    def load_or_create(cls, directory: Path) -> KeyRing:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        ring = cls(directory)
        if not ring.keys:
            ring.rotate()
        return ring

    def rotate(self) -> SigningKey:
        """Adds a new key, which signs from now on."""
        private = ec.generate_private_key(ec.SECP256R1())
        kid = f"{time.strftime('%Y%m%d%H%M%S', time.gmtime())}-{secrets.token_hex(4)}"
        path = self.directory / f"{kid}.pem"
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(pem)
        self.reload()
        return next(k for k in self.keys if k.kid == kid)

    def prune(self, older_than: float) -> list[str]:
        """Removes keys created before ``older_than`` (epoch seconds), never the signing key."""
        removed = []
        for key in self.keys[:-1]:
            if key.created < older_than:
                (self.directory / f"{key.kid}.pem").unlink(missing_ok=True)
                removed.append(key.kid)
        self.reload()
        return removed

    @property
    def current(self) -> SigningKey:
        if not self.keys:
            raise ValueError(f"no signing key in {self.directory}")
        return self.keys[-1]

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        return {"keys": [key.jwk() for key in self.keys]}

    def sign(self, claims: Mapping[str, Any]) -> str:
        """A JWT of ``claims`` signed with the current key, named by its ``kid``."""
        key = self.current
        return jwt.encode(
            dict(claims), key.private_key, algorithm=ALGORITHM, headers={"kid": key.kid}
        )


def issue_access_token(
    ring: KeyRing,
    principal: Principal,
    *,
    issuer: str,
    audience: str,
    ttl: float,
    extra: Mapping[str, Any] | None = None,
) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        "sub": principal.user_id,
        "org_id": principal.org_id,
        "roles": sorted(principal.roles),
        "jti": str(uuid.uuid4()),
        "iat": now,
        "nbf": now,
        "exp": now + int(ttl),
    }
    claims.update(extra or {})
    return ring.sign(claims)


class KeySource(Protocol):
    """Public keys by kid; ``refresh`` asks the source again (for an unknown kid)."""

    async def key(self, kid: str, *, refresh: bool) -> Any: ...


class LocalKeys:
    """The ring's own keys, for the issuer itself (re-read from disk on refresh)."""

    def __init__(self, ring: KeyRing) -> None:
        self._ring = ring

    async def key(self, kid: str, *, refresh: bool) -> Any:
        if refresh:
            self._ring.reload()
        for key in self._ring.keys:
            if key.kid == kid:
                return key.private_key.public_key()
        return None


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


class RedisRevocations:
    """Is the session (``sid`` claim) of a token revoked? Read from the issuer's Redis keys."""

    def __init__(self, client: Any, *, prefix: str = "opsmesh:id:") -> None:
        self._redis = client
        self._prefix = prefix

    async def __call__(self, claims: Mapping[str, Any]) -> bool:
        family = claims.get("sid")
        if not isinstance(family, str):
            return False
        try:
            flag = await self._redis.hget(f"{self._prefix}fam:{family}", "revoked")
        except Exception as error:
            # Fail closed: without the revocation list a token cannot be trusted.
            raise Unauthenticated(
                "cannot check whether the token was revoked; try again",
                reason=errors_pb2.ERROR_REASON_REVOCATION_UNKNOWN,
            ) from error
        return bool(flag in (b"1", "1"))
