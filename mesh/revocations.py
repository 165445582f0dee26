"""The revocation feed: which sessions were revoked, published by the issuer for verifiers.

The identity service owns its storage; what it publishes for others is this feed,
a declared and versioned schema (docs/security.md), shared by the one writer and
every reader:

* key ``opsmesh:revoked:v1:sid:<sid>`` (a string, value ``1``) exists while access
  tokens whose ``sid`` claim is ``<sid>`` must be refused;
* it is written in the same atomic step that revokes the session in the issuer's
  own records, with a TTL that outlives every access token of that session (the
  longest access token lifetime plus the verifiers' clock leeway), so readers
  never need to delete anything;
* a reader that cannot read the feed refuses the token (``REVOCATION_UNKNOWN``):
  a verifier never trusts a token it cannot check.

A new layout gets a new version in the prefix; readers of ``v1`` keep working
until the writer stops publishing it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import redis.asyncio as aioredis

from mesh.errors import Unauthenticated
from mesh.redisconn import RedisSettings, connect_redis
from opsmesh.errors.v1 import errors_pb2

FEED_KEY_PREFIX = "opsmesh:revoked:v1:sid:"
"""Schema v1: one key per revoked session id, its presence is the revocation."""
VERIFIER_LEEWAY = 30.0
"""Seconds of clock skew verifiers accept past ``exp`` (mesh/tokens.py's default leeway)."""


def feed_key(session_id: str) -> str:
    return f"{FEED_KEY_PREFIX}{session_id}"


def feed_ttl_ms(access_token_ttl: float) -> int:
    """How long a revocation stays published: until the session's last access token, issued
    the instant before it was revoked, has expired for every verifier (plus a margin)."""
    return int((access_token_ttl + VERIFIER_LEEWAY + 30.0) * 1000)


class RevocationFeed:
    """Reads the feed: is the session (``sid`` claim) of a token revoked?

    ``client`` is the Redis the feed is published to; ``owned`` says whether this feed
    opened it (and so closes it in :meth:`aclose`) or borrows a service's own client.
    """

    def __init__(self, client: aioredis.Redis, *, owned: bool = False) -> None:
        self._redis = client
        self._owned = owned

    @classmethod
    def open(cls, url: str, *, default: aioredis.Redis | RedisSettings) -> RevocationFeed:
        """The feed at ``url`` (OPSMESH_REVOCATION_FEED_URL); without one, the feed on
        ``default`` (a service's own Redis client, or the settings to connect to)."""
        if url:
            return cls(connect_redis(RedisSettings(url=url)), owned=True)
        if isinstance(default, RedisSettings):
            return cls(connect_redis(default), owned=True)
        return cls(default)

    async def __call__(self, claims: Mapping[str, Any]) -> bool:
        session_id = claims.get("sid")
        if not isinstance(session_id, str):
            return False  # a token without a session (a service's own) is never revoked
        try:
            published = await self._redis.exists(feed_key(session_id))
        except Exception as error:
            # Fail closed: without the revocation feed a token cannot be trusted.
            raise Unauthenticated(
                "cannot check whether the token was revoked; try again",
                reason=errors_pb2.ERROR_REASON_REVOCATION_UNKNOWN,
            ) from error
        return bool(published)

    async def aclose(self) -> None:
        if self._owned:
            await self._redis.aclose()
