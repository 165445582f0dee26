"""Issue #13 (identity): the penetration test's findings, replayed as the attacker's requests
through the real Envoy edge in front of the identity service's OAuth endpoints."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import grpc
import httpx
import pytest
import redis.asyncio as aioredis
from grpc import aio

from devtools.edge import EdgeTopology, envoy_process, free_edge_ports, render
from devtools.servers import RedisServer
from identity_svc.accounts import Accounts, SignInSettings, SignInThrottled, address_key
from identity_svc.config import IdentitySettings
from identity_svc.http import IssuerSettings, client_address, parse_networks
from identity_svc.server import build_runner as build_identity
from mesh.errors import ResourceExhausted
from mesh.redisconn import RedisSettings, connect_redis
from mesh.server import ServiceRunner
from mesh.settings import SettingsError, load
from opsmesh.session.v1 import session_pb2_grpc
from session_svc.config import SessionSettings
from session_svc.server import build_runner
from tests.helpers import (
    redeem_code,
    refresh_grant,
    status_with_token,
    wait_envoy_live,
)

CLIENT = "opsmesh-web"
REDIRECT = "http://localhost:5173/oauth/callback"
PASSWORD = "correct horse battery"
MAX_FAILURES = 5
SERVICE = "task-worker"
# Needs RFC 6749 §2.3.1 form-encoding inside Basic credentials (":" and "%" and "+").
SERVICE_SECRET = "s3cr:t%with+plus-0123456789"


@dataclass
class Stack:
    edge: httpx.AsyncClient
    """A client of the edge that sits behind a trusted proxy (its X-Forwarded-For counts)."""
    issuer: str
    identity_http: str
    sessions: session_pb2_grpc.SessionServiceStub
    redis: aioredis.Redis
    user: str


def this_hosts_addresses() -> list[str]:
    """The host's own IPv4 addresses (Linux). Envoy may see a loopback client under any of
    them (in some sandboxes, the outward interface's)."""
    addresses = {"127.0.0.1"}
    try:
        lines = Path("/proc/net/fib_trie").read_text().splitlines()
    except OSError:
        return sorted(addresses)
    for previous, line in itertools.pairwise(lines):
        if line.strip() == "/32 host LOCAL":
            addresses.add(previous.split()[-1])
    return sorted(addresses)


def stack_environment(ports: dict[str, int], redis_url: str, keys: Path) -> dict[str, str]:
    """The identity service's settings as an operator writes them (OPSMESH_* variables)."""
    return {
        "OPSMESH_GRPC_PORT": "0",
        "OPSMESH_METRICS_PORT": "0",
        "OPSMESH_IDENTITY_HTTP_PORT": str(ports["identity_http"]),
        "OPSMESH_JWT_KEYS_DIR": str(keys),
        "OPSMESH_REDIS_URL": redis_url,
        "OPSMESH_AUTH_MODE": "jwt",
        "OPSMESH_JWT_ISSUER": f"http://localhost:{ports['edge']}",
        "OPSMESH_OAUTH_CLIENTS": f"{CLIENT}={REDIRECT}",
        "OPSMESH_SERVICE_CLIENTS": f"{SERVICE}={SERVICE_SECRET}",
        "OPSMESH_REFRESH_REUSE_GRACE": "5s",
        # The edge, and the test as the proxy in front of it (whose X-Forwarded-For the edge
        # passes on); a direct caller from 127.0.0.2 is no proxy.
        "OPSMESH_TRUSTED_PROXIES": ",".join(this_hosts_addresses()),
        "OPSMESH_LOGIN_MAX_FAILURES": str(MAX_FAILURES),
        "OPSMESH_GRACE_PERIOD": "1",
    }


async def start_verifying_session(
    env: dict[str, str], ports: dict[str, int], feed_url: str
) -> ServiceRunner:
    """A started session service that verifies like every service: the issuer's JWKS and the
    revocation feed (never the issuer's own keys or storage)."""
    session = build_runner(
        SessionSettings.from_env(
            {
                **env,
                "OPSMESH_GRPC_PORT": str(ports["session"]),
                "OPSMESH_JWKS_URL": f"http://127.0.0.1:{ports['identity_http']}/.well-known/jwks.json",
                "OPSMESH_REVOCATION_FEED_URL": feed_url,
            }
        )
    )
    await session.start()
    return session


@pytest.fixture
async def stack(redis_server: RedisServer, tmp_path: Path) -> AsyncIterator[Stack]:
    ports = free_edge_ports()
    env = stack_environment(ports, redis_server.url, tmp_path / "keys")
    identity: ServiceRunner = build_identity(IdentitySettings.from_env(env))
    await identity.start()
    session = await start_verifying_session(env, ports, redis_server.url)
    client = connect_redis(RedisSettings(url=redis_server.url))
    user = f"eve{secrets.token_hex(4)}"
    await Accounts(client).create(org_id="acme", user_id=user, password=PASSWORD)
    config = tmp_path / "envoy.yaml"
    # No ratelimit_svc runs: Envoy's own login limit (failure_mode_deny: false) stays out of
    # the way, so what is measured is the identity service's throttling.
    config.write_text(render(EdgeTopology.dev(ports, ratelimit_domain=f"id{secrets.token_hex(4)}")))
    envoy = envoy_process(config, tmp_path / "envoy.log")
    envoy.start(timeout=30)

    try:
        await wait_envoy_live(ports["admin"])
        async with (
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports['edge']}", timeout=30) as edge,
            aio.insecure_channel(f"127.0.0.1:{ports['session']}") as channel,
        ):
            yield Stack(
                edge,
                env["OPSMESH_JWT_ISSUER"],
                f"http://127.0.0.1:{ports['identity_http']}",
                session_pb2_grpc.SessionServiceStub(channel),
                client,
                user,
            )
    finally:
        envoy.stop()
        await session.stop()
        await identity.stop()
        await client.aclose()


def some_address() -> str:
    """A client address of its own (counters live in the test session's one Redis)."""
    return f"100.{64 + secrets.randbelow(64)}.{secrets.randbelow(256)}.{secrets.randbelow(256)}"


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).decode().rstrip("=")


def authorize_params(challenge: str, scope: str = "openid offline_access") -> dict[str, str]:
    return {
        "response_type": "code",
        "client_id": CLIENT,
        "redirect_uri": REDIRECT,
        "state": "st",
        "scope": scope,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }


async def login_form(http: httpx.AsyncClient, challenge: str) -> dict[str, str]:
    """The hidden fields of the login page (the browser also keeps the page's cookie)."""
    page = await http.get("/oauth/authorize", params=authorize_params(challenge))
    assert page.status_code == 200, page.text
    return dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', page.text))


async def sign_in(
    http: httpx.AsyncClient,
    user: str,
    password: str,
    address: str,
    *,
    form: dict[str, str] | None = None,
) -> httpx.Response:
    """One sign-in from ``address`` (as the trusted proxy in front of the edge reports it)."""
    fields = form if form is not None else await login_form(http, pkce()[1])
    return await http.post(
        "/oauth/authorize",
        data={**fields, "username": user, "password": password},
        headers={"X-Forwarded-For": address},
    )


async def tokens_for(stack: Stack) -> dict[str, str]:
    verifier, challenge = pkce()
    form = await login_form(stack.edge, challenge)
    signed_in = await sign_in(stack.edge, stack.user, PASSWORD, some_address(), form=form)
    assert signed_in.status_code == 302, signed_in.text
    code = parse_qs(urlsplit(signed_in.headers["location"]).query)["code"][0]
    response = await redeem_code(
        stack.edge, code=code, verifier=verifier, client_id=CLIENT, redirect_uri=REDIRECT
    )
    assert response.status_code == 200, response.text
    tokens: dict[str, str] = response.json()
    return tokens


async def refresh(stack: Stack, token: str) -> httpx.Response:
    return await refresh_grant(stack.edge, token, CLIENT)


async def session_status(stack: Stack, access_token: str) -> grpc.StatusCode:
    return await status_with_token(stack.sessions, access_token)


# --- item 1: sign-in lockout ------------------------------------------------------------------


async def test_failed_logins_from_one_client_do_not_lock_out_another(stack: Stack) -> None:
    attacker, victim = some_address(), some_address()
    for _ in range(MAX_FAILURES + 1):
        made_up = f"nobody{secrets.token_hex(3)}"
        assert (await sign_in(stack.edge, made_up, "guess", attacker)).status_code == 401
    for _ in range(MAX_FAILURES):
        assert (await sign_in(stack.edge, stack.user, "guess", attacker)).status_code == 401
    # The attacker is throttled, for this account and with the right password too ...
    assert (await sign_in(stack.edge, stack.user, PASSWORD, attacker)).status_code == 429
    # ... and the user, from their own address, signs in.
    assert (await sign_in(stack.edge, stack.user, PASSWORD, victim)).status_code == 302


async def test_a_direct_caller_cannot_spoof_its_address(stack: Stack) -> None:
    # Not a trusted proxy (127.0.0.2): its X-Forwarded-For is the attacker's own claim.
    transport = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
    async with httpx.AsyncClient(base_url=stack.identity_http, transport=transport) as direct:
        form = await login_form(direct, pkce()[1])
        statuses = [
            (await sign_in(direct, stack.user, "guess", some_address(), form=form)).status_code
            for _ in range(MAX_FAILURES + 1)
        ]
    assert statuses == [401] * MAX_FAILURES + [429]


async def test_parallel_guesses_check_exactly_the_allowed_number_of_passwords(stack: Stack) -> None:
    address = some_address()
    form = await login_form(stack.edge, pkce()[1])
    answers = await asyncio.gather(
        *(sign_in(stack.edge, stack.user, f"guess{n}", address, form=form) for n in range(40))
    )
    statuses = sorted(answer.status_code for answer in answers)
    assert statuses == [401] * MAX_FAILURES + [429] * (40 - MAX_FAILURES)
    assert all(int(a.headers["retry-after"]) > 0 for a in answers if a.status_code == 429)


# --- item 5: refresh rotation -----------------------------------------------------------------


async def test_a_thief_replaying_within_the_grace_gets_only_the_same_successor_once(
    stack: Stack,
) -> None:
    stolen = await tokens_for(stack)
    legitimate = await refresh(stack, stolen["refresh_token"])
    assert legitimate.status_code == 200
    successor = legitimate.json()["refresh_token"]
    replays = [await refresh(stack, stolen["refresh_token"]) for _ in range(6)]
    # The one allowed retry hands out nothing new; every further replay ends the family.
    assert replays[0].status_code == 200
    assert replays[0].json()["refresh_token"] == successor
    assert [r.status_code for r in replays[1:]] == [400] * 5
    assert (await refresh(stack, successor)).json()["error"] == "invalid_grant"
    assert await session_status(stack, legitimate.json()["access_token"]) == (
        grpc.StatusCode.UNAUTHENTICATED
    )


async def test_ten_parallel_refreshes_give_one_new_pair_and_revoke_the_family(stack: Stack) -> None:
    first = await tokens_for(stack)
    answers = await asyncio.gather(*(refresh(stack, first["refresh_token"]) for _ in range(10)))
    granted = [a.json() for a in answers if a.status_code == 200]
    assert 1 <= len(granted) <= 2
    assert len({body["refresh_token"] for body in granted}) == 1
    assert all(a.json()["error"] == "invalid_grant" for a in answers if a.status_code != 200)
    # More than the one retry: theft, so nothing of the family works any more.
    assert (await refresh(stack, granted[0]["refresh_token"])).status_code == 400
    for body in (first, *granted):
        assert await session_status(stack, body["access_token"]) == (
            grpc.StatusCode.UNAUTHENTICATED
        )


# --- item 8: Basic client credentials ---------------------------------------------------------


def basic(raw: bytes) -> str:
    return "Basic " + base64.b64encode(raw).decode()


@pytest.mark.parametrize(
    "authorization",
    [
        "Basic a",
        "Basic !!!!",
        basic(b"no-colon"),
        basic(b"\xff\xfe:\xfd"),
        basic(b"%FF%FE:secret"),
        basic(b":secret-without-client"),
        basic(f"{SERVICE}:wrong".encode()),
    ],
    ids=["short", "not-base64", "no-colon", "not-utf8", "percent-not-utf8", "no-id", "wrong"],
)
async def test_malformed_basic_credentials_are_invalid_client(
    stack: Stack, authorization: str
) -> None:
    response = await stack.edge.post(
        "/oauth/token",
        data={"grant_type": "client_credentials"},
        headers={"Authorization": authorization},
    )
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"
    assert response.headers["www-authenticate"].startswith("Basic")


async def test_basic_credentials_are_form_encoded(stack: Stack) -> None:
    encoded = f"{quote(SERVICE, safe='')}:{quote(SERVICE_SECRET, safe='')}".encode()
    response = await stack.edge.post(
        "/oauth/token",
        data={"grant_type": "client_credentials"},
        headers={"Authorization": basic(encoded)},
    )
    assert response.status_code == 200, response.text
    assert "refresh_token" not in response.json()


# --- item 9: scope, origin, headers, expiring keys --------------------------------------------


async def test_unsupported_scopes_are_refused(stack: Stack) -> None:
    page = await stack.edge.get(
        "/oauth/authorize", params=authorize_params(pkce()[1], scope="openid admin")
    )
    assert page.status_code == 400
    assert page.json()["error"] == "invalid_scope"


async def test_only_offline_access_earns_a_refresh_token(stack: Stack) -> None:
    verifier, challenge = pkce()
    page = await stack.edge.get("/oauth/authorize", params=authorize_params(challenge, "openid"))
    form = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', page.text))
    signed_in = await sign_in(stack.edge, stack.user, PASSWORD, some_address(), form=form)
    code = parse_qs(urlsplit(signed_in.headers["location"]).query)["code"][0]
    body = (
        await redeem_code(
            stack.edge, code=code, verifier=verifier, client_id=CLIENT, redirect_uri=REDIRECT
        )
    ).json()
    assert body["scope"] == "openid"
    assert "refresh_token" not in body
    assert "id_token" in body


async def test_a_login_post_from_elsewhere_is_refused(stack: Stack) -> None:
    form = await login_form(stack.edge, pkce()[1])
    fields = {**form, "username": stack.user, "password": PASSWORD}
    foreign = await stack.edge.post(
        "/oauth/authorize", data=fields, headers={"Origin": "https://evil.example"}
    )
    assert foreign.status_code == 403
    # A page posted from another site: the browser sends no cookie of ours (SameSite).
    async with httpx.AsyncClient(base_url=str(stack.edge.base_url)) as cookieless:
        assert (await cookieless.post("/oauth/authorize", data=fields)).status_code == 403
    # The form token is bound to the authorization request it was issued for.
    swapped = {**fields, "code_challenge": pkce()[1]}
    assert (await stack.edge.post("/oauth/authorize", data=swapped)).status_code == 403
    # Under Referrer-Policy: no-referrer a browser sends `Origin: null` with our own form:
    # the cookie and the form token decide then.
    async with httpx.AsyncClient(base_url=str(stack.edge.base_url)) as cookieless:
        refused = await cookieless.post("/oauth/authorize", data=fields, headers={"Origin": "null"})
        assert refused.status_code == 403
    nulled = await stack.edge.post("/oauth/authorize", data=fields, headers={"Origin": "null"})
    assert nulled.status_code == 302
    own = await stack.edge.post("/oauth/authorize", data=fields, headers={"Origin": stack.issuer})
    assert own.status_code == 302


async def test_the_login_page_forbids_framing_sniffing_and_referrers(stack: Stack) -> None:
    page = await stack.edge.get("/oauth/authorize", params=authorize_params(pkce()[1]))
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["referrer-policy"] == "no-referrer"
    policy = page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in policy
    assert "default-src 'none'" in policy
    assert "form-action 'self' http://localhost:5173" in policy


async def test_failed_code_exchanges_leave_no_key_without_expiry(stack: Stack) -> None:
    for overrides in ({"client_id": "someone-else"}, {"code_verifier": "x" * 43}):
        verifier, challenge = pkce()
        form = await login_form(stack.edge, challenge)
        signed_in = await sign_in(stack.edge, stack.user, PASSWORD, some_address(), form=form)
        code = parse_qs(urlsplit(signed_in.headers["location"]).query)["code"][0]
        exchange = {
            "grant_type": "authorization_code",
            "code": code,
            "client_id": CLIENT,
            "redirect_uri": REDIRECT,
            "code_verifier": verifier,
        }
        failed = await stack.edge.post("/oauth/token", data={**exchange, **overrides})
        assert failed.json()["error"] == "invalid_grant"
        replayed = await stack.edge.post("/oauth/token", data=exchange)
        assert replayed.json()["error"] == "invalid_grant"
    # What sign-in, codes, tokens, families and the password reset write is temporary; the
    # accounts, organizations, invitations and audit logs of other tests in this Redis are not.
    kinds = ("code", "codeused", "rt", "fam", "userfam", "fail", "reset", "resetuser", "resetreq")
    temporary = tuple(f"opsmesh:id:{kind}:".encode() for kind in kinds)
    forever = [
        key
        async for key in stack.redis.scan_iter(match="opsmesh:id:*")
        if key.startswith(temporary) and await stack.redis.pttl(key) == -1
    ]
    assert forever == []


# --- item 6: argon2 off the event loop --------------------------------------------------------


async def test_password_checks_leave_the_event_loop_serving(stack: Stack) -> None:
    forms = [await login_form(stack.edge, pkce()[1]) for _ in range(6)]
    logins = asyncio.ensure_future(
        asyncio.gather(
            *(sign_in(stack.edge, stack.user, PASSWORD, some_address(), form=f) for f in forms)
        )
    )
    # The service runs in this process: its loop is this loop, so a blocked loop shows here
    # as ticks that come late. argon2 on the loop blocks it almost all the time the logins
    # take; in threads, only a busy machine's scheduling delays a tick now and then.
    began, stalled = time.perf_counter(), 0.0
    while not logins.done():
        tick = time.perf_counter()
        await asyncio.sleep(0.005)
        stalled += max(0.0, time.perf_counter() - tick - 0.025)
    assert [r.status_code for r in await logins] == [302] * 6
    share = stalled / (time.perf_counter() - began)
    assert share < 0.5, f"the loop was blocked {share:.0%} of the time"


async def test_password_checks_beyond_the_queue_are_refused_not_queued(
    redis_server: RedisServer,
) -> None:
    client = connect_redis(RedisSettings(url=redis_server.url))
    accounts = Accounts(
        client, prefix=f"t{secrets.token_hex(4)}:", settings=SignInSettings(hash_threads=1)
    )
    prefix = f"t{secrets.token_hex(4)}:"
    crowded = Accounts(
        client,
        prefix=prefix,
        settings=SignInSettings(hash_threads=1, hash_queue=0, max_failures_per_account=0),
    )
    try:
        account = await accounts.create(org_id="acme", user_id="ann", password=PASSWORD)
        address = some_address()
        outcomes = await asyncio.gather(
            *(crowded.verify("bob", "guess", address) for _ in range(3)), return_exceptions=True
        )
        refused = [o for o in outcomes if isinstance(o, ResourceExhausted)]
        assert refused
        assert not any(isinstance(o, SignInThrottled) for o in refused)
        # Refused before any check: those attempts were given back.
        checked = len(outcomes) - len(refused)
        assert int(await client.get(f"{prefix}fail:a:{address}") or 0) == checked
        assert await accounts.verify("ANN", PASSWORD, "2001:db8::1") == account
    finally:
        accounts.close()
        crowded.close()
        await client.aclose()


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        ("198.51.100.9", ["203.0.113.5"], "198.51.100.9"),  # not a proxy: XFF is ignored
        ("127.0.0.1", ["203.0.113.5, 127.0.0.1"], "203.0.113.5"),
        ("127.0.0.1", ["1.1.1.1, 203.0.113.5, 10.0.0.7"], "203.0.113.5"),  # leftmost is a lie
        ("127.0.0.1", ["1.1.1.1", "203.0.113.5"], "203.0.113.5"),  # several headers
        ("127.0.0.1", ["not-an-ip, 10.0.0.7"], "10.0.0.7"),
        ("127.0.0.1", [], "127.0.0.1"),
        ("unknown", ["203.0.113.5"], "unknown"),
    ],
)
def test_the_client_address_is_the_nearest_untrusted_hop(
    peer: str, forwarded: list[str], expected: str
) -> None:
    trusted = parse_networks("127.0.0.1/32, 10.0.0.0/8")
    assert client_address(peer, forwarded, trusted) == expected


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("192.0.2.1", "192.0.2.1"),
        ("unknown", "unknown"),
    ],
)
def test_one_ipv6_client_counts_as_its_slash_64(address: str, key: str) -> None:
    assert address_key(address) == key


def test_sign_in_settings_are_read_and_checked() -> None:
    environ = {
        "OPSMESH_JWT_KEYS_DIR": "/nonexistent/keys",
        "OPSMESH_TRUSTED_PROXIES": "127.0.0.1, 10.0.0.0/8, fd00::/8",
        "OPSMESH_LOGIN_MAX_FAILURES": "3",
        "OPSMESH_LOGIN_MAX_FAILURES_PER_ACCOUNT": "0",
        "OPSMESH_PASSWORD_HASH_QUEUE": "4",
    }
    issuer, sign_in = load(IssuerSettings, environ), load(SignInSettings, environ)
    assert [str(n) for n in issuer.trusted_proxies] == ["127.0.0.1/32", "10.0.0.0/8", "fd00::/8"]
    assert (sign_in.max_failures, sign_in.max_failures_per_account) == (3, 0)
    assert sign_in.hash_queue == 4
    bad = {
        "OPSMESH_JWT_KEYS_DIR": "/nonexistent/keys",
        "OPSMESH_TRUSTED_PROXIES": "10.0.0.0/8, x.y",
    }
    with pytest.raises(SettingsError, match=r"'x\.y' is no IP address or CIDR"):
        load(IssuerSettings, bad)
