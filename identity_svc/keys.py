"""The issuer's signing keys and access tokens: ES256 keys with rotation, issuing, signing.

Keys live in a directory as ``<kid>.pem`` (private, mode 0600); the newest signs,
every key stays published in the JWKS until it is pruned, so tokens signed
before a rotation verify until they expire. Only the identity service holds
them; every other service verifies with the published JWKS (mesh/tokens.py).
"""

from __future__ import annotations

import base64
import os
import secrets
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mesh.context import Principal
from mesh.tokens import ALGORITHM


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
