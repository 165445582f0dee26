"""Access tokens attacked as an attacker would: every forged or stale token must fail."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc import aio

from devtools.servers import RedisServer, free_port
from identity_svc.keys import KeyRing, LocalKeys, issue_access_token
from identity_svc.server import build_runner as build_identity
from mesh.auth import AuthSettings
from mesh.context import Principal
from mesh.errors import Unauthenticated
from mesh.redisconn import RedisSettings, connect_redis
from mesh.revocations import RevocationFeed, feed_key
from mesh.tokens import JwtAuthenticator, RemoteJwks
from opsmesh.errors.v1 import errors_pb2
from opsmesh.session.v1 import session_pb2 as pb
from opsmesh.session.v1 import session_pb2_grpc
from session_svc.server import build_runner
from tests.conftest import FAST_HEALTH, identity_settings, session_settings

ISSUER = "http://127.0.0.1:8090"
AUDIENCE = "opsmesh"
ADA = Principal("ada", "acme", frozenset({"admin"}))
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def ring(tmp_path: Path) -> KeyRing:
    return KeyRing.load_or_create(tmp_path / "keys")


def verifier(ring: KeyRing, revoked: set[str] | None = None) -> JwtAuthenticator:
    async def is_revoked(claims) -> bool:
        return claims["jti"] in (revoked or set())

    return JwtAuthenticator(
        keys=LocalKeys(ring), issuer=ISSUER, audience=AUDIENCE, leeway=5, revoked=is_revoked
    )


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def issue(ring: KeyRing, **claims) -> str:
    return issue_access_token(ring, ADA, issuer=ISSUER, audience=AUDIENCE, ttl=600, extra=claims)


def b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


async def test_a_valid_token_gives_the_principal(ring) -> None:
    principal = await verifier(ring).authenticate(bearer(issue(ring)), "/x/Y")
    assert principal == ADA


def hs256(claims: dict, secret: bytes, kid: str) -> str:
    """The classic key-confusion forgery: HMAC keyed with the issuer's public key."""
    signing_input = f"{b64({'alg': 'HS256', 'typ': 'JWT', 'kid': kid})}.{b64(claims)}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(mac).decode().rstrip('=')}"


def forgeries(ring: KeyRing) -> dict[str, str]:
    good = issue(ring)
    header, payload, signature = good.split(".")
    claims = jwt.decode(good, options={"verify_signature": False})
    public_pem = ring.current.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    attacker = ec.generate_private_key(ec.SECP256R1())
    now = int(time.time())
    return {
        "alg-none": f"{b64({'alg': 'none', 'typ': 'JWT', 'kid': ring.current.kid})}.{payload}.",
        "hs256-with-public-key": hs256(claims, public_pem, ring.current.kid),
        "expired": issue(ring, iat=now - 7200, nbf=now - 7200, exp=now - 3600),
        "not-yet-valid": issue(ring, nbf=now + 3600),
        "wrong-issuer": issue(ring, iss="https://evil.example"),
        "wrong-audience": issue(ring, aud="someone-else"),
        "unknown-kid": jwt.encode(
            claims, attacker, algorithm="ES256", headers={"kid": "no-such-key"}
        ),
        "attacker-key-same-kid": jwt.encode(
            claims, attacker, algorithm="ES256", headers={"kid": ring.current.kid}
        ),
        "tampered-payload": f"{header}.{b64({**claims, 'org_id': 'globex'})}.{signature}",
        "no-org": jwt.encode(
            {k: v for k, v in claims.items() if k != "org_id"},
            ring.current.private_key,
            algorithm="ES256",
            headers={"kid": ring.current.kid},
        ),
        "no-jti": jwt.encode(
            {k: v for k, v in claims.items() if k != "jti"},
            ring.current.private_key,
            algorithm="ES256",
            headers={"kid": ring.current.kid},
        ),
        "garbage": "not.a.token",
    }


@pytest.mark.parametrize(
    "forgery",
    [
        "alg-none",
        "hs256-with-public-key",
        "expired",
        "not-yet-valid",
        "wrong-issuer",
        "wrong-audience",
        "unknown-kid",
        "attacker-key-same-kid",
        "tampered-payload",
        "no-org",
        "no-jti",
        "garbage",
    ],
)
async def test_forged_or_stale_tokens_are_unauthenticated(ring, forgery) -> None:
    token = forgeries(ring)[forgery]
    with pytest.raises(Unauthenticated):
        await verifier(ring).authenticate(bearer(token), "/x/Y")


async def test_missing_or_revoked_tokens_are_unauthenticated(ring) -> None:
    token = issue(ring)
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    for metadata in ({}, {"authorization": "Basic abc"}, {"authorization": "Bearer "}):
        with pytest.raises(Unauthenticated):
            await verifier(ring).authenticate(metadata, "/x/Y")
    with pytest.raises(Unauthenticated, match="revoked"):
        await verifier(ring, revoked={jti}).authenticate(bearer(token), "/x/Y")


async def test_rotation_keeps_old_tokens_valid_until_their_key_is_pruned(ring) -> None:
    old = issue(ring)
    os.utime(ring.directory / f"{ring.current.kid}.pem", (time.time() - 7200, time.time() - 7200))
    ring.reload()
    new_key = ring.rotate()
    new = issue(ring)
    assert jwt.get_unverified_header(new)["kid"] == new_key.kid
    assert len(ring.jwks()["keys"]) == 2
    assert await verifier(ring).authenticate(bearer(old), "/x/Y") == ADA
    assert ring.prune(time.time() - 3600) != []
    with pytest.raises(Unauthenticated, match="unknown key"):
        await verifier(ring).authenticate(bearer(old), "/x/Y")
    assert await verifier(ring).authenticate(bearer(new), "/x/Y") == ADA


async def test_services_verify_against_the_published_jwks_and_see_rotations(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    port = free_port()
    issuer = f"http://127.0.0.1:{port}"
    settings = session_settings(redis_server.url)
    settings = type(settings)(
        server=settings.server,
        redis=settings.redis,
        limits=settings.limits,
        key_prefix=settings.key_prefix,
        auth=AuthSettings(mode="jwt", issuer=issuer, audience=AUDIENCE),
    )
    identity = build_identity(
        identity_settings(redis_server.url, keys_dir=tmp_path / "keys", http_port=port),
        options=FAST_HEALTH,
    )
    await identity.start()
    runner = build_runner(settings, options=FAST_HEALTH)
    await runner.start()
    remote = RemoteJwks(f"{issuer}/.well-known/jwks.json", min_refresh=0)
    try:
        async with httpx.AsyncClient() as http:
            discovery = (await http.get(f"{issuer}/.well-known/openid-configuration")).json()
        assert discovery["jwks_uri"] == f"{issuer}/.well-known/jwks.json"
        ring = KeyRing(tmp_path / "keys")
        remote_verifier = JwtAuthenticator(keys=remote, issuer=issuer, audience=AUDIENCE)
        token = issue_access_token(ring, ADA, issuer=issuer, audience=AUDIENCE, ttl=600)
        assert await remote_verifier.authenticate(bearer(token), "/x/Y") == ADA
        ring.rotate()  # the operator rotates: a verifier picks the new key up by itself
        rotated = issue_access_token(ring, ADA, issuer=issuer, audience=AUDIENCE, ttl=600)
        assert await remote_verifier.authenticate(bearer(rotated), "/x/Y") == ADA

        # The session service itself now wants tokens: headers alone no longer work.
        async with aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel:
            stub = session_pb2_grpc.SessionServiceStub(channel)
            created = await stub.CreateSession(
                pb.CreateSessionRequest(), metadata=(("authorization", f"Bearer {rotated}"),)
            )
            assert (created.session.user_id, created.session.org_id) == ("ada", "acme")
            with pytest.raises(aio.AioRpcError) as caught:
                await stub.CreateSession(
                    pb.CreateSessionRequest(),
                    metadata=(("x-opsmesh-user-id", "ada"), ("x-opsmesh-org-id", "acme")),
                )
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            globex = issue_access_token(
                ring, Principal("ada", "globex"), issuer=issuer, audience=AUDIENCE, ttl=600
            )
            with pytest.raises(aio.AioRpcError) as caught:
                await stub.GetSession(
                    pb.GetSessionRequest(session_id=created.session.id),
                    metadata=(("authorization", f"Bearer {globex}"),),
                )
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await remote.close()
        await runner.stop()
        await identity.stop()


async def test_unreachable_jwks_refuses_rather_than_trusts() -> None:
    remote = RemoteJwks(f"http://127.0.0.1:{free_port()}/.well-known/jwks.json")
    with pytest.raises(Unauthenticated, match="unreachable"):
        await JwtAuthenticator(keys=remote, issuer=ISSUER, audience=AUDIENCE).authenticate(
            bearer(
                jwt.encode(
                    {"sub": "x"},
                    ec.generate_private_key(ec.SECP256R1()),
                    algorithm="ES256",
                    headers={"kid": "k"},
                )
            ),
            "/x/Y",
        )
    await remote.close()


def test_operator_command_prints_a_token_that_verifies(tmp_path: Path) -> None:
    env = dict(os.environ, OPSMESH_JWT_KEYS_DIR=str(tmp_path / "keys"), OPSMESH_JWT_ISSUER=ISSUER)

    def tokens(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "identity_svc.tokens", *args],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    issued = tokens("issue", "--user", "ada", "--org", "acme", "--roles", "admin", "--ttl", "5m")
    assert issued.returncode == 0, issued.stderr
    claims = jwt.decode(issued.stdout.strip(), options={"verify_signature": False})
    assert (claims["sub"], claims["org_id"], claims["roles"]) == ("ada", "acme", ["admin"])
    assert claims["exp"] - claims["iat"] == 300
    assert tokens("issue", "--user", "bad user", "--org", "acme").returncode == 2
    assert tokens("issue", "--user", "a", "--org", "b", "--ttl", "forever").returncode == 2
    assert "new signing key" in tokens("rotate").stdout
    assert "removed 0 key(s)" in tokens("prune", "--older-than", "1d").stdout
    assert tokens("prune", "--older-than", "soon").returncode == 2


async def test_the_revocation_feed_refuses_published_sessions_and_fails_closed(
    ring, redis_server: RedisServer
) -> None:
    client = connect_redis(RedisSettings(url=redis_server.url))
    feed = RevocationFeed(client)
    check = JwtAuthenticator(keys=LocalKeys(ring), issuer=ISSUER, audience=AUDIENCE, revoked=feed)
    sid = f"sid-{uuid.uuid4()}"
    try:
        assert await check.authenticate(bearer(issue(ring, sid=sid)), "/x/Y") == ADA
        await client.set(feed_key(sid), "1", px=60_000)
        with pytest.raises(Unauthenticated) as revoked:
            await check.authenticate(bearer(issue(ring, sid=sid)), "/x/Y")
        assert revoked.value.reason == errors_pb2.ERROR_REASON_TOKEN_REVOKED
        assert await check.authenticate(bearer(issue(ring)), "/x/Y") == ADA  # no sid: no session
    finally:
        await client.aclose()
    # A feed that cannot be read refuses every token with a session, never trusts it.
    dead = RevocationFeed.open(f"redis://127.0.0.1:{free_port()}/0", default=client)
    blind = JwtAuthenticator(keys=LocalKeys(ring), issuer=ISSUER, audience=AUDIENCE, revoked=dead)
    try:
        with pytest.raises(Unauthenticated) as unknown:
            await blind.authenticate(bearer(issue(ring, sid=sid)), "/x/Y")
        assert unknown.value.reason == errors_pb2.ERROR_REASON_REVOCATION_UNKNOWN
    finally:
        await dead.aclose()
