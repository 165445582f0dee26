"""The OAuth 2.1 authorization server, driven like a browser and attacked like an attacker."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import secrets
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import grpc
import httpx
import jwt
import pytest
from grpc import aio

from devtools.servers import RedisServer, free_port
from identity_svc.accounts import Accounts
from identity_svc.keys import KeyRing, issue_access_token
from identity_svc.oauth import OAuthSettings
from identity_svc.server import build_runner as build_identity
from mesh.auth import AuthSettings
from mesh.clients import ServiceCredentials
from mesh.context import Principal
from mesh.errors import DependencyUnavailable
from mesh.natsconn import NatsSettings
from mesh.redisconn import RedisSettings, connect_redis
from mesh.revocations import feed_key, feed_ttl_ms
from mesh.settings import ServerSettings
from opsmesh.identity.v1 import identity_pb2, identity_pb2_grpc
from opsmesh.session.v1 import session_pb2 as pb
from opsmesh.session.v1 import session_pb2_grpc
from opsmesh.task.v1 import task_pb2, task_pb2_grpc
from session_svc.server import build_runner
from task_svc.config import TaskSettings, Topology
from task_svc.server import build_runner as build_tasks
from tests.conftest import FAST_HEALTH, identity_settings, session_settings
from tests.helpers import redeem_code, refresh_grant, status_with_token
from tests.taskkit import retry_policies

CLIENT = "opsmesh-web"
REDIRECT = "http://localhost:5173/oauth/callback"
PASSWORD = "correct horse battery"
SERVICE_SECRET = "worker-secret-0123456789"
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Issuer:
    http: httpx.AsyncClient
    sessions: session_pb2_grpc.SessionServiceStub
    """A session service verifying like every service: the issuer's JWKS and revocation feed."""
    identity: identity_pb2_grpc.IdentityServiceStub
    url: str
    user: str


@pytest.fixture
async def issuer(redis_server: RedisServer, tmp_path: Path) -> AsyncIterator[Issuer]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    identity = build_identity(
        identity_settings(
            redis_server.url,
            keys_dir=tmp_path / "keys",
            http_port=port,
            access_token_ttl=300,
            oauth=OAuthSettings(
                clients={CLIENT: (REDIRECT,)},
                reuse_grace=1.0,
                service_clients={
                    "task-worker": hashlib.sha256(SERVICE_SECRET.encode()).hexdigest()
                },
            ),
        ),
        options=FAST_HEALTH,
    )
    session_base = session_settings(redis_server.url)
    sessions = build_runner(
        type(session_base)(
            server=session_base.server,
            redis=session_base.redis,
            limits=session_base.limits,
            key_prefix=session_base.key_prefix,
            auth=AuthSettings(mode="jwt", issuer=url, audience="opsmesh"),
        ),
        options=FAST_HEALTH,
    )
    user = f"ada{secrets.token_hex(3)}"
    client = connect_redis(RedisSettings(url=redis_server.url))
    await Accounts(client).create(org_id="acme", user_id=user, password=PASSWORD, roles="admin")
    await client.aclose()
    await identity.start()
    await sessions.start()
    try:
        async with (
            httpx.AsyncClient(base_url=url) as http,
            aio.insecure_channel(f"127.0.0.1:{sessions.port}") as session_channel,
            aio.insecure_channel(f"127.0.0.1:{identity.port}") as identity_channel,
        ):
            yield Issuer(
                http,
                session_pb2_grpc.SessionServiceStub(session_channel),
                identity_pb2_grpc.IdentityServiceStub(identity_channel),
                url,
                user,
            )
    finally:
        await sessions.stop()
        await identity.stop()


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = (
        base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
    )
    return verifier, challenge


def authorize_params(challenge: str, **overrides: str) -> dict[str, str]:
    return {
        "response_type": "code",
        "client_id": CLIENT,
        "redirect_uri": REDIRECT,
        "state": "xyz",
        "scope": "openid offline_access",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        **overrides,
    }


async def log_in(
    issuer: Issuer, challenge: str, password: str = PASSWORD, **overrides: str
) -> httpx.Response:
    page = await issuer.http.get(
        "/oauth/authorize", params=authorize_params(challenge, **overrides)
    )
    assert page.status_code == 200, page.text
    assert '<input id="password"' in page.text
    form = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', page.text))
    return await issuer.http.post(
        "/oauth/authorize", data={**form, "username": issuer.user, "password": password}
    )


async def code_for(issuer: Issuer, challenge: str) -> str:
    response = await log_in(issuer, challenge)
    assert response.status_code == 302, response.text
    location = urlsplit(response.headers["location"])
    assert f"{location.scheme}://{location.netloc}{location.path}" == REDIRECT
    query = parse_qs(location.query)
    assert query["state"] == ["xyz"]
    assert query["iss"] == [issuer.url]
    return query["code"][0]


async def exchange(issuer: Issuer, code: str, verifier: str, **overrides: str) -> httpx.Response:
    return await redeem_code(
        issuer.http,
        code=code,
        verifier=verifier,
        client_id=CLIENT,
        redirect_uri=REDIRECT,
        overrides=overrides,
    )


async def refresh(issuer: Issuer, token: str) -> httpx.Response:
    return await refresh_grant(issuer.http, token, CLIENT)


async def call_as(issuer: Issuer, access_token: str) -> grpc.StatusCode:
    return await status_with_token(issuer.sessions, access_token)


async def test_pkce_login_refresh_rotation_and_reuse_revokes_the_family(issuer) -> None:
    discovery = (await issuer.http.get("/.well-known/openid-configuration")).json()
    assert discovery["code_challenge_methods_supported"] == ["S256"]
    assert discovery["token_endpoint"] == f"{issuer.url}/oauth/token"
    verifier, challenge = pkce()
    tokens = await exchange(issuer, await code_for(issuer, challenge), verifier)
    assert tokens.status_code == 200, tokens.text
    first = tokens.json()
    assert first["token_type"] == "Bearer"
    assert tokens.headers["cache-control"] == "no-store"
    assert await call_as(issuer, first["access_token"]) == grpc.StatusCode.OK

    second = (await refresh(issuer, first["refresh_token"])).json()
    assert second["refresh_token"] != first["refresh_token"]
    third_response = await refresh(issuer, second["refresh_token"])
    third = third_response.json()
    assert third_response.status_code == 200
    await asyncio.sleep(1.2)  # past the reuse grace
    reused = await refresh(issuer, first["refresh_token"])
    assert reused.status_code == 400
    assert reused.json()["error"] == "invalid_grant"
    # The whole family is gone: the newest refresh token and the access tokens too.
    assert (await refresh(issuer, third["refresh_token"])).json()["error"] == "invalid_grant"
    assert await call_as(issuer, third["access_token"]) == grpc.StatusCode.UNAUTHENTICATED
    assert await call_as(issuer, first["access_token"]) == grpc.StatusCode.UNAUTHENTICATED


async def test_openid_sign_in_returns_an_id_token_echoing_the_nonce(issuer) -> None:
    verifier, challenge = pkce()
    response = await log_in(issuer, challenge, nonce="n-0S6_WzA2Mj")
    code = parse_qs(urlsplit(response.headers["location"]).query)["code"][0]
    body = (await exchange(issuer, code, verifier)).json()
    keys = {
        key["kid"]: key for key in (await issuer.http.get("/.well-known/jwks.json")).json()["keys"]
    }
    header = jwt.get_unverified_header(body["id_token"])
    public = jwt.PyJWK(keys[header["kid"]]).key
    claims = jwt.decode(
        body["id_token"], public, algorithms=["ES256"], audience=CLIENT, issuer=issuer.url
    )
    assert claims["nonce"] == "n-0S6_WzA2Mj"
    assert claims["sub"] == claims["preferred_username"] == issuer.user
    assert claims["azp"] == CLIENT
    assert claims["auth_time"] <= claims["iat"]
    # An ID token says who signed in; it opens no service (its audience is the client).
    assert await call_as(issuer, body["id_token"]) == grpc.StatusCode.UNAUTHENTICATED
    # Without the openid scope there is no ID token.
    verifier, challenge = pkce()
    response = await log_in(issuer, challenge, scope="offline_access")
    code = parse_qs(urlsplit(response.headers["location"]).query)["code"][0]
    assert "id_token" not in (await exchange(issuer, code, verifier)).json()


async def test_a_lost_refresh_response_is_retryable_once_with_the_same_successor(
    issuer,
) -> None:
    verifier, challenge = pkce()
    first = (await exchange(issuer, await code_for(issuer, challenge), verifier)).json()
    second = await refresh(issuer, first["refresh_token"])
    retried = await refresh(issuer, first["refresh_token"])  # the answer got lost: retry
    assert second.status_code == retried.status_code == 200
    assert retried.json()["refresh_token"] == second.json()["refresh_token"]
    assert retried.json()["scope"] == "openid offline_access"
    # Once only: a third presentation is reuse, and the family goes.
    assert (await refresh(issuer, first["refresh_token"])).json()["error"] == "invalid_grant"
    assert (await refresh(issuer, second.json()["refresh_token"])).status_code == 400


async def test_the_grace_ends_once_the_successor_is_used(issuer) -> None:
    verifier, challenge = pkce()
    first = (await exchange(issuer, await code_for(issuer, challenge), verifier)).json()
    second = (await refresh(issuer, first["refresh_token"])).json()
    third = await refresh(issuer, second["refresh_token"])
    assert third.status_code == 200
    # The client clearly got the successor: presenting its predecessor is theft.
    assert (await refresh(issuer, first["refresh_token"])).json()["error"] == "invalid_grant"
    assert (await refresh(issuer, third.json()["refresh_token"])).status_code == 400


async def test_only_offline_access_earns_a_refresh_token(issuer) -> None:
    verifier, challenge = pkce()
    response = await log_in(issuer, challenge, scope="openid")
    code = parse_qs(urlsplit(response.headers["location"]).query)["code"][0]
    body = (await exchange(issuer, code, verifier)).json()
    assert "refresh_token" not in body
    assert body["scope"] == "openid"
    assert await call_as(issuer, body["access_token"]) == grpc.StatusCode.OK


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"code_verifier": ""}, "invalid_grant"),
        ({"code_verifier": secrets.token_urlsafe(48)}, "invalid_grant"),
        ({"redirect_uri": "http://localhost:5173/evil"}, "invalid_grant"),
        ({"client_id": "someone-else"}, "invalid_grant"),
    ],
    ids=["no-verifier", "wrong-verifier", "other-redirect", "other-client"],
)
async def test_token_exchange_refuses_what_pkce_and_binding_forbid(
    issuer, overrides, error
) -> None:
    verifier, challenge = pkce()
    response = await exchange(issuer, await code_for(issuer, challenge), verifier, **overrides)
    assert response.status_code == 400
    assert response.json()["error"] == error


async def test_a_replayed_code_fails_and_revokes_what_it_issued(issuer) -> None:
    verifier, challenge = pkce()
    code = await code_for(issuer, challenge)
    first = (await exchange(issuer, code, verifier)).json()
    replay = await exchange(issuer, code, verifier)
    assert replay.json()["error"] == "invalid_grant"
    assert await call_as(issuer, first["access_token"]) == grpc.StatusCode.UNAUTHENTICATED
    assert (await refresh(issuer, first["refresh_token"])).json()["error"] == "invalid_grant"


@pytest.mark.parametrize(
    ("overrides", "status", "error"),
    [
        ({"code_challenge_method": "plain"}, 400, "invalid_request"),
        ({"code_challenge": ""}, 400, "invalid_request"),
        ({"redirect_uri": "http://localhost:5173/oauth/callback/../evil"}, 400, "invalid_request"),
        ({"redirect_uri": "http://localhost:5173/oauth/callbackx"}, 400, "invalid_request"),
        ({"client_id": "unknown"}, 401, "invalid_client"),
        ({"response_type": "token"}, 400, "unsupported_response_type"),
    ],
    ids=[
        "plain-method",
        "no-challenge",
        "path-trick",
        "prefix-match",
        "unknown-client",
        "implicit",
    ],
)
async def test_authorize_refuses_anything_but_exact_pkce_s256_code_requests(
    issuer, overrides, status, error
) -> None:
    _, challenge = pkce()
    page = await issuer.http.get(
        "/oauth/authorize", params=authorize_params(challenge, **overrides)
    )
    assert page.status_code == status
    assert page.json()["error"] == error


async def test_login_brute_force_is_limited(issuer, redis_server: RedisServer) -> None:
    _, challenge = pkce()
    try:
        for _ in range(5):
            assert (await log_in(issuer, challenge, password="wrong password!")).status_code == 401
        locked = await log_in(issuer, challenge)  # even the right password now waits
        assert locked.status_code == 429
        assert int(locked.headers["retry-after"]) > 0
    finally:
        # The per-address counter would lock the other tests (all from 127.0.0.1) out too.
        client = connect_redis(RedisSettings(url=redis_server.url))
        await client.delete("opsmesh:id:fail:a:127.0.0.1")
        await client.aclose()


async def test_revocation_ends_the_session_for_services(issuer) -> None:
    verifier, challenge = pkce()
    tokens = (await exchange(issuer, await code_for(issuer, challenge), verifier)).json()
    assert (
        await issuer.http.post("/oauth/revoke", data={"token": tokens["refresh_token"]})
    ).status_code == 200
    assert (await issuer.http.post("/oauth/revoke", data={"token": "unknown"})).status_code == 200
    assert await call_as(issuer, tokens["access_token"]) == grpc.StatusCode.UNAUTHENTICATED
    assert (await refresh(issuer, tokens["refresh_token"])).json()["error"] == "invalid_grant"
    assert (await issuer.http.post("/oauth/token", data={"grant_type": "password"})).json()[
        "error"
    ] == "unsupported_grant_type"


def test_account_command_creates_users_with_generated_or_given_passwords(
    redis_server: RedisServer,
) -> None:
    env = dict(os.environ, OPSMESH_REDIS_URL=redis_server.url)
    user = f"cli{secrets.token_hex(3)}"

    def accounts(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "identity_svc.accounts", "create", *args],
            env=env,
            cwd=ROOT,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    created = accounts("--org", "acme", "--user", user)
    assert created.returncode == 0, created.stderr
    assert "password: " in created.stdout
    assert accounts("--org", "acme", "--user", user).returncode == 1
    assert accounts("--org", "acme", "--user", user, "--if-missing").returncode == 0
    assert (
        accounts(
            "--org", "acme", "--user", f"{user}x", "--password-stdin", stdin="short\n"
        ).returncode
        == 2
    )
    assert (
        accounts(
            "--org", "acme", "--user", f"{user}y", "--password-stdin", stdin=PASSWORD + "\n"
        ).returncode
        == 0
    )


async def test_every_service_refuses_a_revoked_session_task_service_too(
    issuer, redis_server: RedisServer, nats_server
) -> None:

    runner = await build_tasks(
        TaskSettings(
            server=ServerSettings(port=0),
            nats=NatsSettings(url=nats_server.url),
            topology=Topology(namespace=f"t{uuid.uuid4().hex[:8]}"),
            retry=retry_policies(),
            auth=AuthSettings(mode="jwt", issuer=issuer.url, audience="opsmesh"),
            revocations=RedisSettings(url=redis_server.url),
        )
    )
    await runner.start()
    try:
        verifier, challenge = pkce()
        tokens = (await exchange(issuer, await code_for(issuer, challenge), verifier)).json()
        metadata = (("authorization", f"Bearer {tokens['access_token']}"),)
        async with aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel:
            stub = task_pb2_grpc.TaskServiceStub(channel)
            assert (
                await stub.ListTasks(task_pb2.ListTasksRequest(), metadata=metadata)
            ).tasks == []
            await issuer.http.post("/oauth/revoke", data={"token": tokens["refresh_token"]})
            with pytest.raises(aio.AioRpcError) as caught:
                await stub.ListTasks(task_pb2.ListTasksRequest(), metadata=metadata)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await runner.stop()


async def test_service_credentials_act_for_the_org_each_call_names(issuer) -> None:
    refused = await issuer.http.post(
        "/oauth/token", data={"grant_type": "client_credentials"}, auth=("task-worker", "wrong")
    )
    assert refused.status_code == 401
    assert refused.json()["error"] == "invalid_client"
    credentials = ServiceCredentials(
        token_url=f"{issuer.url}/oauth/token", client_id="task-worker", secret=SERVICE_SECRET
    )
    try:
        acting = await credentials(Principal(issuer.user, "acme"))
        assert await credentials.token() == acting[0][1].removeprefix("Bearer ")  # reused
        verifier, challenge = pkce()
        user = (await exchange(issuer, await code_for(issuer, challenge), verifier)).json()
        as_user = (("authorization", f"Bearer {user['access_token']}"),)
        created = await issuer.sessions.CreateSession(pb.CreateSessionRequest(), metadata=as_user)
        listed = await issuer.sessions.ListSessions(pb.ListSessionsRequest(), metadata=acting)
        assert [s.id for s in listed.sessions] == [created.session.id]
        service_only = (acting[0],)
        with pytest.raises(aio.AioRpcError) as caught:
            await issuer.sessions.ListSessions(pb.ListSessionsRequest(), metadata=service_only)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # A user's token cannot act for anyone else, whatever it sends along.
        sneaky = (
            *as_user,
            ("x-opsmesh-act-as-user", "someone"),
            ("x-opsmesh-act-as-org", "globex"),
        )
        mine = await issuer.sessions.ListSessions(pb.ListSessionsRequest(), metadata=sneaky)
        assert [s.user_id for s in mine.sessions] == [issuer.user]
    finally:
        await credentials.close()


async def test_unreachable_token_endpoint_is_unavailable() -> None:
    credentials = ServiceCredentials(
        token_url=f"http://127.0.0.1:{free_port()}/oauth/token", client_id="x", secret="y"
    )
    with pytest.raises(DependencyUnavailable):
        await credentials.token()
    await credentials.close()


async def test_current_user_names_the_caller_and_the_account_identity_holds(
    issuer, tmp_path: Path
) -> None:
    verifier, challenge = pkce()
    tokens = (await exchange(issuer, await code_for(issuer, challenge), verifier)).json()
    as_user = (("authorization", f"Bearer {tokens['access_token']}"),)
    user = (
        await issuer.identity.GetCurrentUser(identity_pb2.GetCurrentUserRequest(), metadata=as_user)
    ).user
    assert (user.user_id, user.org_id, list(user.roles)) == (issuer.user, "acme", ["admin"])
    assert user.account_kind == identity_pb2.ACCOUNT_KIND_LOCAL

    credentials = ServiceCredentials(
        token_url=f"{issuer.url}/oauth/token", client_id="task-worker", secret=SERVICE_SECRET
    )
    try:
        acting = await credentials(Principal(issuer.user, "acme"))
        service = (
            await issuer.identity.GetCurrentUser(
                identity_pb2.GetCurrentUserRequest(), metadata=acting
            )
        ).user
        assert service.account_kind == identity_pb2.ACCOUNT_KIND_SERVICE
    finally:
        await credentials.close()
    # An operator's token for the same user in an org where identity holds no account of theirs.
    elsewhere = issue_access_token(
        KeyRing.load_or_create(tmp_path / "keys"),
        Principal(issuer.user, "globex", frozenset({"viewer"})),
        issuer=issuer.url,
        audience="opsmesh",
        ttl=60,
    )
    foreign = (
        await issuer.identity.GetCurrentUser(
            identity_pb2.GetCurrentUserRequest(),
            metadata=(("authorization", f"Bearer {elsewhere}"),),
        )
    ).user
    assert (foreign.org_id, list(foreign.roles)) == ("globex", ["viewer"])
    assert foreign.account_kind == identity_pb2.ACCOUNT_KIND_NONE
    with pytest.raises(aio.AioRpcError) as caught:
        await issuer.identity.GetCurrentUser(identity_pb2.GetCurrentUserRequest())
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _sid(access_token: str) -> str:
    return str(jwt.decode(access_token, options={"verify_signature": False})["sid"])


async def test_revocation_is_published_on_the_feed_in_the_same_step_and_expires(
    issuer, redis_server: RedisServer
) -> None:
    """Every revocation path (sign-out, refresh-token reuse, code replay) writes the feed key
    from inside the script that marks the family revoked, with a TTL covering the session's
    access tokens; verifiers read only the feed."""
    client = connect_redis(RedisSettings(url=redis_server.url))
    try:
        # Sign-out: watch Redis execute it; both writes come from the one Lua script.
        verifier, challenge = pkce()
        tokens = (await exchange(issuer, await code_for(issuer, challenge), verifier)).json()
        sid = _sid(tokens["access_token"])
        assert not await client.exists(feed_key(sid))
        async with client.monitor() as monitor:
            revoke = asyncio.ensure_future(
                issuer.http.post("/oauth/revoke", data={"token": tokens["refresh_token"]})
            )
            writes = []
            async for command in monitor.listen():
                if sid in command["command"] and command["command"].split()[0] in ("HSET", "SET"):
                    writes.append(command)
                if command["command"].startswith(f"SET {feed_key(sid)}"):
                    break
            assert (await revoke).status_code == 200
        assert [w["client_type"] for w in writes] == ["lua", "lua"], writes
        assert "revoked" in writes[0]["command"]
        ttl = await client.pttl(feed_key(sid))
        assert 300_000 < ttl <= feed_ttl_ms(300)  # outlives every access token, then expires
        assert await call_as(issuer, tokens["access_token"]) == grpc.StatusCode.UNAUTHENTICATED
        # The verifier reads the feed, not the issuer's records: without the feed entry the
        # (still revoked) session's access token would pass again.
        await client.delete(feed_key(sid))
        assert await call_as(issuer, tokens["access_token"]) == grpc.StatusCode.OK

        # Refresh-token reuse.
        verifier, challenge = pkce()
        first = (await exchange(issuer, await code_for(issuer, challenge), verifier)).json()
        await refresh(issuer, first["refresh_token"])
        await refresh(issuer, first["refresh_token"])  # the grace answer
        assert (await refresh(issuer, first["refresh_token"])).json()["error"] == "invalid_grant"
        assert 0 < await client.pttl(feed_key(_sid(first["access_token"]))) <= feed_ttl_ms(300)

        # Code replay.
        verifier, challenge = pkce()
        code = await code_for(issuer, challenge)
        redeemed = (await exchange(issuer, code, verifier)).json()
        assert (await exchange(issuer, code, verifier)).json()["error"] == "invalid_grant"
        assert 0 < await client.pttl(feed_key(_sid(redeemed["access_token"]))) <= feed_ttl_ms(300)
        assert await call_as(issuer, redeemed["access_token"]) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await client.aclose()
