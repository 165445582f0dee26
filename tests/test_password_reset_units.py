"""Issue #17: the one password policy and the reset links' store (real Redis)."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from devtools.servers import RedisServer
from identity_svc.accounts import Accounts
from identity_svc.passwords import MIN_PASSWORD, WeakPassword, check_password, common_passwords
from identity_svc.reset import LinkState, ResetLinkRefused, ResetLinks, ResetSettings, link_digest
from mesh.errors import AlreadyExists, InvalidArgument
from mesh.redisconn import RedisSettings, connect_redis
from mesh.settings import SettingsError, load


@pytest.mark.parametrize(
    ("password", "why"),
    [
        ("short-one", "at least 12"),
        ("x" * 257, "at most 256"),
        ("ada.lovelace-rocks", "user name"),
        ("my-mail-ADA@EXAMPLE.COM", "user name or email"),
        ("qwertyuiop12", "most common"),
        ("Password2024!", "most common"),
        ("!!!Sunshine123456", "most common"),
        ("qwertyqwertyqwerty", "most common"),
        ("abababababab", "most common"),
        ("aaaa1111aaaa", "different characters"),
    ],
)
def test_the_policy_refuses_with_a_clear_message(password: str, why: str) -> None:
    with pytest.raises(WeakPassword) as refused:
        check_password(password, user_id="ada.lovelace", email="ada@example.com")
    assert why in refused.value.message
    assert password not in refused.value.message  # never echoed
    assert isinstance(refused.value, InvalidArgument)  # gRPC callers answer INVALID_ARGUMENT


@pytest.mark.parametrize(
    "password", ["correct horse battery", "Tr0ub4dor&3-river", "ünïcödé-pässwörd"]
)
def test_the_policy_accepts_long_uncommon_passwords(password: str) -> None:
    check_password(password, user_id="ada", email="ada@example.com")


def test_the_shipped_list_is_the_common_passwords_lower_case() -> None:
    listed = common_passwords()
    assert len(listed) >= 9_000
    assert {"123456", "password", "qwerty", "iloveyou"} <= listed
    assert all(word == word.lower() for word in listed)
    assert MIN_PASSWORD == 12


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    redis = connect_redis(RedisSettings(url=redis_server.url))
    yield redis
    await redis.aclose()


def links_on(client: aioredis.Redis, **settings: float) -> ResetLinks:
    return ResetLinks(
        client,
        prefix=f"t{secrets.token_hex(4)}:",
        settings=ResetSettings(**settings),  # type: ignore[arg-type]
    )


async def refusal(work: asyncio.Future[str] | object) -> LinkState:
    with pytest.raises(ResetLinkRefused) as refused:
        await work  # type: ignore[misc]
    return refused.value.state


async def test_a_link_works_once_and_only_its_hash_is_stored(client: aioredis.Redis) -> None:
    links = links_on(client)
    token = await links.issue("ada")
    assert await links.check(token) == "ada"  # looking does not use it
    stored = [key async for key in client.scan_iter(match=f"{links._prefix}*")]
    assert not any(token.encode() in key for key in stored)
    assert any(link_digest(token).encode() in key for key in stored)
    assert await links.use(token) == "ada"
    assert await refusal(links.use(token)) is LinkState.USED
    assert await refusal(links.check(token)) is LinkState.USED
    assert await refusal(links.check("not-a-token")) is LinkState.UNKNOWN
    assert await refusal(links.check("")) is LinkState.UNKNOWN


async def test_parallel_uses_of_one_link_set_one_password(client: aioredis.Redis) -> None:
    links = links_on(client)
    token = await links.issue("ada")
    outcomes = await asyncio.gather(*(links.use(token) for _ in range(10)), return_exceptions=True)
    assert outcomes.count("ada") == 1
    assert all(isinstance(o, ResetLinkRefused) for o in outcomes if o != "ada")


async def test_a_new_link_replaces_the_previous_one(client: aioredis.Redis) -> None:
    links = links_on(client)
    first = await links.issue("ada")
    second = await links.issue("ada")
    assert await refusal(links.use(first)) is LinkState.REPLACED
    assert await links.use(second) == "ada"


async def test_an_expired_link_is_refused_and_every_key_expires(client: aioredis.Redis) -> None:
    links = links_on(client, link_ttl=60)
    token = await links.issue("ada")
    record = f"{links._prefix}reset:{link_digest(token)}"
    # Moves the expiry into the past (what 30 minutes of waiting would do).
    await client.hset(record, "expires", int(time.time() * 1000) - 1)
    assert await refusal(links.use(token)) is LinkState.EXPIRED
    keys = [key async for key in client.scan_iter(match=f"{links._prefix}*")]
    assert keys
    assert [key for key in keys if await client.pttl(key) <= 0] == []


async def test_every_way_to_set_a_password_applies_the_one_policy(
    client: aioredis.Redis,
) -> None:
    accounts = Accounts(client, prefix=f"t{secrets.token_hex(4)}:")
    try:
        with pytest.raises(WeakPassword):
            await accounts.create(org_id="acme", user_id="ada", password="password123456")
        account = await accounts.create(
            org_id="acme", user_id="ada", password="correct horse battery", email="Ada@Example.com"
        )
        with pytest.raises(WeakPassword):
            await accounts.set_password("ada", "ada-and-nothing-else")
        await accounts.set_password("ada", "a brand new sentence")
        assert await accounts.verify("ada", "a brand new sentence", "192.0.2.1") == account
        assert await accounts.verify("ada", "correct horse battery", "192.0.2.1") is None
    finally:
        accounts.close()


async def test_an_account_is_found_by_user_name_or_email(client: aioredis.Redis) -> None:
    accounts = Accounts(client, prefix=f"t{secrets.token_hex(4)}:")
    try:
        await accounts.create(
            org_id="acme", user_id="ada", password="correct horse battery", email="ada@example.com"
        )
        for login in ("ada", "ADA", " ada@example.com", "Ada@Example.COM"):
            found = await accounts.find_by_login(login)
            assert found is not None, login
            assert (found.user_id, found.email) == ("ada", "ada@example.com")
        assert await accounts.find_by_login("bob@example.com") is None
        assert await accounts.find_by_login("bob") is None
        with pytest.raises(AlreadyExists):  # one account per address: it is how reset finds it
            await accounts.create(
                org_id="acme",
                user_id="bob",
                password="correct horse battery",
                email="ADA@example.com",
            )
        with pytest.raises(InvalidArgument):
            await accounts.create(
                org_id="acme", user_id="eve", password="correct horse battery", email="eve@nowhere"
            )
    finally:
        accounts.close()


def test_the_reset_settings_are_read_and_checked() -> None:
    environ = {
        "OPSMESH_PASSWORD_RESET_TTL": "15m",
        "OPSMESH_PASSWORD_RESET_WINDOW": "2h",
        "OPSMESH_PASSWORD_RESET_MAX_PER_ACCOUNT": "4",
        "OPSMESH_PASSWORD_RESET_MAX_PER_ADDRESS": "40",
    }
    assert load(ResetSettings, environ) == ResetSettings(
        link_ttl=900, window=7200, max_per_account=4, max_per_address=40
    )
    assert load(ResetSettings, {}) == ResetSettings()  # 30 min, 3 and 10 an hour
    bad = {"OPSMESH_PASSWORD_RESET_TTL": "5s", "OPSMESH_PASSWORD_RESET_MAX_PER_ACCOUNT": "0"}
    with pytest.raises(SettingsError) as refused:
        load(ResetSettings, bad)
    assert "OPSMESH_PASSWORD_RESET_TTL" in str(refused.value)
    assert "OPSMESH_PASSWORD_RESET_MAX_PER_ACCOUNT" in str(refused.value)
