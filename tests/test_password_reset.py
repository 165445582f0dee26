"""Issue #17, password reset: "Forgot password?" through the real Envoy edge in front of the
identity service, with a session service verifying tokens like every service does.

The emails are what identity hands to its mailer (notify_svc's SendEmail in the stack);
the mailer here records them, so that a test can follow the link like a person would.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import grpc
import httpx
import pytest
import redis.asyncio as aioredis
from grpc import aio

from devtools.edge import EdgeTopology, envoy_process, free_edge_ports, render
from devtools.servers import RedisServer
from identity_svc.accounts import Accounts
from identity_svc.audit import AuditLog
from identity_svc.config import IdentitySettings
from identity_svc.reset import link_digest
from identity_svc.server import build_runner as build_identity
from mesh.redisconn import RedisSettings, connect_redis
from mesh.server import ServiceRunner
from opsmesh.session.v1 import session_pb2_grpc
from tests.helpers import (
    assert_eventually,
    redeem_code,
    refresh_grant,
    status_with_token,
    wait_envoy_live,
)
from tests.test_identity_attacks import (
    CLIENT,
    PASSWORD,
    REDIRECT,
    login_form,
    pkce,
    sign_in,
    some_address,
    stack_environment,
    start_verifying_session,
)

NEW_PASSWORD = "a brand new sentence of words"
HIDDEN = re.compile(r'<input type="hidden" name="([^"]+)" value="([^"]*)"')
PER_ACCOUNT = 3
PER_ADDRESS = 5


@dataclass(frozen=True, kw_only=True)
class SentEmail:
    template: str
    to: str
    data: Mapping[str, Any]


@dataclass
class RecordingMailer:
    """Stands in for notify_svc: keeps what identity asked to send."""

    sent: list[SentEmail] = field(default_factory=list)

    async def send_email(
        self, *, template: str, to: str, org_id: str, data: Mapping[str, Any]
    ) -> None:
        self.sent.append(SentEmail(template=template, to=to, data=dict(data)))

    def to(self, address: str, template: str) -> list[SentEmail]:
        return [m for m in self.sent if m.to == address and m.template == template]


@dataclass
class Stack:
    edge: httpx.AsyncClient
    issuer: str
    sessions: session_pb2_grpc.SessionServiceStub
    redis: aioredis.Redis
    mailer: RecordingMailer
    user: str
    email: str
    envoy_log: Path


@pytest.fixture
async def stack(redis_server: RedisServer, tmp_path: Path) -> AsyncIterator[Stack]:
    ports = free_edge_ports()
    env = {
        **stack_environment(ports, redis_server.url, tmp_path / "keys"),
        "OPSMESH_PASSWORD_RESET_MAX_PER_ACCOUNT": str(PER_ACCOUNT),
        "OPSMESH_PASSWORD_RESET_MAX_PER_ADDRESS": str(PER_ADDRESS),
    }
    mailer = RecordingMailer()
    identity: ServiceRunner = build_identity(IdentitySettings.from_env(env), mailer=mailer)
    await identity.start()
    session = await start_verifying_session(env, ports, redis_server.url)
    client = connect_redis(RedisSettings(url=redis_server.url))
    user = f"rita{secrets.token_hex(4)}"
    email = f"{user}@example.com"
    await Accounts(client).create(org_id="acme", user_id=user, password=PASSWORD, email=email)
    config = tmp_path / "envoy.yaml"
    config.write_text(render(EdgeTopology.dev(ports, ratelimit_domain=f"pw{secrets.token_hex(4)}")))
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
                session_pb2_grpc.SessionServiceStub(channel),
                client,
                mailer,
                user,
                email,
                tmp_path / "envoy.log",
            )
    finally:
        envoy.stop()
        await session.stop()
        await identity.stop()
        await client.aclose()


async def ask_for_reset(
    http: httpx.AsyncClient, login: str, address: str, *, headers: Mapping[str, str] | None = None
) -> httpx.Response:
    """ "Forgot password?" for ``login`` from ``address``, as a browser fills the form."""
    page = await http.get("/account/password/forgot")
    assert page.status_code == 200, page.text
    form = dict(HIDDEN.findall(page.text))
    return await http.post(
        "/account/password/forgot",
        data={**form, "login": login},
        headers={"X-Forwarded-For": address, **(headers or {})},
    )


async def reset_link(stack: Stack) -> str:
    """Asks for a reset of the stack's user and returns the emailed link."""
    before = len(stack.mailer.to(stack.email, "password_reset"))
    answer = await ask_for_reset(stack.edge, stack.user, some_address())
    assert answer.status_code == 200, answer.text

    async def mailed() -> None:
        assert len(stack.mailer.to(stack.email, "password_reset")) == before + 1

    await assert_eventually(mailed)
    url = str(stack.mailer.to(stack.email, "password_reset")[-1].data["reset_url"])
    assert url.startswith(f"{stack.issuer}/account/password/reset?token=")
    return url


def on_edge(url: str) -> str:
    """The link's path and query (the test reaches the edge by address, not by its name)."""
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


async def set_password(
    stack: Stack, link: str, password: str, confirm: str | None = None
) -> httpx.Response:
    page = await stack.edge.get(on_edge(link))
    if page.status_code != 200:
        return page
    form = dict(HIDDEN.findall(page.text))
    return await stack.edge.post(
        "/account/password/reset",
        data={**form, "password": password, "confirm": password if confirm is None else confirm},
        headers={"Origin": "null"},  # what a browser sends under Referrer-Policy: no-referrer
    )


async def signed_in_tokens(stack: Stack, password: str = PASSWORD) -> dict[str, str]:
    verifier, challenge = pkce()
    form = await login_form(stack.edge, challenge)
    signed_in = await sign_in(stack.edge, stack.user, password, some_address(), form=form)
    assert signed_in.status_code == 302, signed_in.text
    code = parse_qs(urlsplit(signed_in.headers["location"]).query)["code"][0]
    response = await redeem_code(
        stack.edge, code=code, verifier=verifier, client_id=CLIENT, redirect_uri=REDIRECT
    )
    assert response.status_code == 200, response.text
    tokens: dict[str, str] = response.json()
    return tokens


def comparable(
    response: httpx.Response, login: str
) -> tuple[int, str, tuple[tuple[str, str], ...]]:
    """What a client sees of an answer, without what differs per request anyway."""
    varying = {
        "date",
        "set-cookie",
        "x-request-id",
        "x-envoy-upstream-service-time",
        "content-length",
    }
    headers = tuple(sorted((k, v) for k, v in response.headers.items() if k not in varying))
    return response.status_code, response.text.replace(login, "LOGIN"), headers


async def test_existing_and_missing_accounts_get_the_same_answer(stack: Stack) -> None:
    missing_user = f"nobody{secrets.token_hex(4)}"
    missing_email = f"{missing_user}@example.com"
    answers = {
        login: await ask_for_reset(stack.edge, login, some_address())
        for login in (stack.user, stack.email, missing_user, missing_email)
    }
    seen = {comparable(answer, login) for login, answer in answers.items()}
    assert len(seen) == 1, seen
    assert answers[stack.user].status_code == 200

    async def mailed() -> None:
        assert len(stack.mailer.to(stack.email, "password_reset")) == 2

    await assert_eventually(mailed)
    assert {m.to for m in stack.mailer.sent} == {stack.email}


async def test_the_link_works_once_and_ends_every_session(stack: Stack) -> None:
    before = await signed_in_tokens(stack)
    assert await status_with_token(stack.sessions, before["access_token"]) == grpc.StatusCode.OK
    link = await reset_link(stack)

    page = await stack.edge.get(on_edge(link))
    assert page.status_code == 200
    assert page.headers["referrer-policy"] == "no-referrer"
    assert 'action="/account/password/reset"' in page.text  # the token is not in the POST's URL
    changed = await set_password(stack, link, NEW_PASSWORD)
    assert changed.status_code == 200, changed.text
    assert "signed out" in changed.text

    # Every session of the account ends: refresh tokens, and access tokens at their next call.
    refreshed = await refresh_grant(stack.edge, before["refresh_token"], CLIENT)
    assert refreshed.json()["error"] == "invalid_grant"
    assert await status_with_token(stack.sessions, before["access_token"]) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    assert (await sign_in(stack.edge, stack.user, PASSWORD, some_address())).status_code == 401
    after = await signed_in_tokens(stack, NEW_PASSWORD)
    assert await status_with_token(stack.sessions, after["access_token"]) == grpc.StatusCode.OK

    # Once: the same link neither opens the form nor sets a password again.
    again = await stack.edge.get(on_edge(link))
    assert again.status_code == 410
    assert "already used" in again.text
    replay = await stack.edge.post(
        "/account/password/reset",
        data={**dict(HIDDEN.findall(page.text)), "password": PASSWORD, "confirm": PASSWORD},
    )
    assert replay.status_code == 410

    async def told() -> None:
        notice = stack.mailer.to(stack.email, "password_changed")
        assert len(notice) == 1
        assert "token" not in str(notice[0].data)

    await assert_eventually(told)
    # The organization's admins can read who reset what, and from where.
    events = await AuditLog(stack.redis).page("acme", before=None, limit=50)
    resets = [e for e in events if e.action == "password.reset" and e.target == stack.user]
    assert len(resets) == 1
    assert resets[0].actor == stack.user


async def test_an_expired_a_replaced_and_a_made_up_link_are_refused(stack: Stack) -> None:
    expired = await reset_link(stack)
    token = parse_qs(urlsplit(expired).query)["token"][0]
    # What 30 minutes of waiting does to the record.
    await stack.redis.hset(
        f"opsmesh:id:reset:{link_digest(token)}", "expires", int(time.time() * 1000) - 1
    )
    refused = await stack.edge.get(on_edge(expired))
    assert refused.status_code == 410
    assert "expired" in refused.text
    assert (await set_password(stack, expired, NEW_PASSWORD)).status_code == 410

    replaced = await reset_link(stack)
    newest = await reset_link(stack)
    assert "replaced" in (await stack.edge.get(on_edge(replaced))).text
    made_up = await stack.edge.get("/account/password/reset", params={"token": "x" * 43})
    assert made_up.status_code == 404
    assert (await set_password(stack, newest, NEW_PASSWORD)).status_code == 200


async def test_a_weak_password_is_refused_and_the_link_still_works(stack: Stack) -> None:
    link = await reset_link(stack)
    for password, confirm, why in (
        ("short", None, "at least 12"),
        (f"{stack.user}-is-me", None, "user name"),
        ("password123456", None, "most common"),
        (NEW_PASSWORD, "something else entirely", "differ"),
    ):
        answer = await set_password(stack, link, password, confirm)
        assert answer.status_code == 400, password
        assert why in answer.text
    assert (await set_password(stack, link, NEW_PASSWORD)).status_code == 200


async def test_requests_are_limited_per_account_and_per_address(stack: Stack) -> None:
    missing = f"nobody{secrets.token_hex(4)}"
    for login in (stack.user, missing):
        statuses = [
            (await ask_for_reset(stack.edge, login, some_address())).status_code
            for _ in range(PER_ACCOUNT + 1)
        ]
        assert statuses == [200] * PER_ACCOUNT + [429], login  # the same for both
    address = some_address()
    statuses = [
        (await ask_for_reset(stack.edge, f"n{secrets.token_hex(4)}", address)).status_code
        for _ in range(PER_ADDRESS + 1)
    ]
    assert statuses == [200] * PER_ADDRESS + [429]
    # The user, from their own address, is only limited by their account's budget.
    assert len(stack.mailer.to(stack.email, "password_reset")) <= PER_ACCOUNT


async def test_forms_from_elsewhere_are_refused(stack: Stack) -> None:
    page = await stack.edge.get("/account/password/forgot")
    form = {**dict(HIDDEN.findall(page.text)), "login": stack.user}
    foreign = await stack.edge.post(
        "/account/password/forgot", data=form, headers={"Origin": "https://evil.example"}
    )
    assert foreign.status_code == 403
    async with httpx.AsyncClient(base_url=str(stack.edge.base_url)) as cookieless:
        assert (await cookieless.post("/account/password/forgot", data=form)).status_code == 403
    assert stack.mailer.sent == []


async def test_the_pages_send_no_referrer_and_keep_their_security_headers(stack: Stack) -> None:
    pages = [
        await stack.edge.get(
            "/oauth/authorize",
            params={
                "response_type": "code",
                "client_id": CLIENT,
                "redirect_uri": REDIRECT,
                "scope": "openid",
                "code_challenge": pkce()[1],
                "code_challenge_method": "S256",
            },
        ),
        await stack.edge.get("/account/password/forgot"),
        await stack.edge.get("/account/password/reset", params={"token": "unknown"}),
    ]
    for answer in pages:
        assert answer.headers["referrer-policy"] == "no-referrer", answer.url
        assert answer.headers["x-frame-options"] == "DENY"
        assert answer.headers["cache-control"] == "no-store"
        policy = answer.headers["content-security-policy"]
        assert "default-src 'none'" in policy
        assert "style-src 'self'" in policy
        assert "frame-ancestors 'none'" in policy
        assert '<link rel="stylesheet" href="/account/style.css">' in answer.text
    assert 'href="/account/password/forgot"' in pages[0].text  # "Forgot password?"
    style = await stack.edge.get("/account/style.css")
    assert style.status_code == 200
    assert style.headers["content-type"].startswith("text/css")
    assert "--accent" in style.text


async def test_a_reset_token_appears_in_no_log(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    link = await reset_link(stack)
    assert (await set_password(stack, link, NEW_PASSWORD)).status_code == 200
    token = parse_qs(urlsplit(link).query)["token"][0]
    # Every log record but the test's own HTTP client's (which prints the URLs it fetches).
    product = [
        record.getMessage()
        for record in caplog.records
        if not record.name.startswith(("httpx", "httpcore"))
    ]
    assert product  # the services did log (the reset among others)
    assert not [line for line in product if token in line]
    assert token not in stack.envoy_log.read_text(errors="replace")
    keys = [key async for key in stack.redis.scan_iter(match="opsmesh:id:*")]
    assert not any(token.encode() in key for key in keys)
