"""Local accounts: users of organizations, passwords hashed with argon2id, in Redis.

Sign-in attempts are throttled per (account, client address), per client address
and, much higher, per account (docs/identity.md explains the trade-off). An attempt
is reserved atomically in Redis before the password is checked, so parallel guesses
cannot slip past the limit; a successful sign-in gives its reservation back. argon2
runs in a small thread pool (it releases the GIL) so the event loop keeps serving.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import secrets
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import redis.asyncio as aioredis
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from mesh.context import parse_identifier, parse_roles
from mesh.errors import (
    AlreadyExists,
    InvalidArgument,
    OpsmeshError,
    ResourceExhausted,
    Unauthenticated,
)
from mesh.redisconn import DEFAULT_REDIS_URL, RedisSettings, connect_redis, redis_errors
from mesh.settings import EnvReader

MIN_PASSWORD = 12
_HASHER = PasswordHasher()  # argon2id with the library's current recommended parameters
# Verified against when the user does not exist, so both paths cost the same.
_DUMMY = _HASHER.hash("opsmesh-no-such-user")
T = TypeVar("T")

# KEYS: the attempt counters; ARGV[1]: window (ms); ARGV[i + 1]: the limit of KEYS[i].
# Either every counter takes the attempt or none does (the reply is then the wait in ms).
_RESERVE = """
for i, key in ipairs(KEYS) do
  if tonumber(redis.call('GET', key) or '0') >= tonumber(ARGV[i + 1]) then
    return math.max(redis.call('PTTL', key), 1000)
  end
end
for _, key in ipairs(KEYS) do
  redis.call('INCR', key)
  redis.call('PEXPIRE', key, ARGV[1], 'NX')
end
return 0
"""
# Gives back the attempt a sign-in reserved: after the right password (ARGV[1] = '1') the
# (account, address) failures are forgiven too; after a refusal to check, only the one attempt.
_RELEASE = """
for i, key in ipairs(KEYS) do
  if i == 1 and ARGV[1] == '1' then
    redis.call('DEL', key)
  elseif tonumber(redis.call('GET', key) or '0') > 0 then
    redis.call('DECR', key)
  end
end
return 0
"""


@dataclass(frozen=True, kw_only=True)
class SignInSettings:
    max_failures: int = 5
    """Per (account, client address) within the window."""
    max_failures_per_address: int = 20
    """Per client address (an IPv6 address counts as its /64), whatever the accounts."""
    max_failures_per_account: int = 100
    """Per account from all addresses together; 0 turns this limit off."""
    failure_window: float = 900.0
    hash_threads: int = max(1, (os.cpu_count() or 2) // 2)
    """Password checks running at once (argon2 uses ~64 MiB and a core each); half the
    cores by default, so that the event loop keeps a core while many users sign in."""
    hash_queue: int = 16
    """Password checks that may wait for a thread; more are refused (429)."""

    @classmethod
    def from_env(cls, env: EnvReader) -> SignInSettings:
        return cls(
            max_failures=env.integer("OPSMESH_LOGIN_MAX_FAILURES", 5, minimum=1, maximum=1000),
            max_failures_per_address=env.integer(
                "OPSMESH_LOGIN_MAX_FAILURES_PER_ADDRESS", 20, minimum=1, maximum=100_000
            ),
            max_failures_per_account=env.integer(
                "OPSMESH_LOGIN_MAX_FAILURES_PER_ACCOUNT", 100, minimum=0, maximum=1_000_000
            ),
            failure_window=env.seconds(
                "OPSMESH_LOGIN_FAILURE_WINDOW", 900, minimum=1, maximum=86400
            ),
            hash_threads=env.integer(
                "OPSMESH_PASSWORD_HASH_THREADS", cls.hash_threads, minimum=1, maximum=64
            ),
            hash_queue=env.integer("OPSMESH_PASSWORD_HASH_QUEUE", 16, minimum=0, maximum=10_000),
        )


@dataclass(frozen=True, slots=True)
class Account:
    user_id: str
    org_id: str
    roles: frozenset[str]


class SignInThrottled(ResourceExhausted):
    """Too many failed sign-ins for this account from this address (or from this address)."""


class HashPool:
    """Runs argon2 off the event loop, ``threads`` at a time; ``queue`` more may wait."""

    def __init__(self, *, threads: int, queue: int) -> None:
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="argon2")
        self._capacity = threads + queue
        self._admitted = 0

    async def run(self, work: Callable[[], T]) -> T:
        if self._admitted >= self._capacity:
            raise ResourceExhausted("too many sign-ins at once; try again", retry_after=1.0)
        self._admitted += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, work)
        finally:
            self._admitted -= 1

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def address_key(address: str) -> str:
    """The counter key of a client address: one IPv6 client owns a whole /64."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address[:64]
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.ip_network(f"{parsed}/64", strict=False))
    return str(parsed)


def _check_password(stored: str, password: str) -> bool:
    try:
        return _HASHER.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return False


class Accounts:
    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str = "opsmesh:id:",
        settings: SignInSettings | None = None,
    ) -> None:
        self._redis = client
        self._prefix = prefix
        self.settings = settings or SignInSettings()
        self._hashes = HashPool(threads=self.settings.hash_threads, queue=self.settings.hash_queue)
        self._reserve = client.register_script(_RESERVE)
        self._release = client.register_script(_RELEASE)

    def _user_key(self, user_id: str) -> str:
        return f"{self._prefix}user:{user_id}"

    async def create(self, *, org_id: str, user_id: str, password: str, roles: str = "") -> Account:
        try:
            account = Account(
                user_id=parse_identifier(user_id.lower(), "user"),
                org_id=parse_identifier(org_id, "org"),
                roles=parse_roles(roles),
            )
        except Unauthenticated as error:
            raise InvalidArgument(error.message) from None
        if len(password) < MIN_PASSWORD:
            raise InvalidArgument(f"a password needs at least {MIN_PASSWORD} characters")
        hashed = await self._hashes.run(lambda: _HASHER.hash(password))
        record = json.dumps({"org": account.org_id, "roles": sorted(account.roles), "hash": hashed})
        with redis_errors():
            created = await self._redis.set(self._user_key(account.user_id), record, nx=True)
        if not created:
            raise AlreadyExists(f"user {account.user_id} exists")
        return account

    def _counters(self, user_id: str, address: str) -> tuple[list[str], list[int]]:
        """The attempt counters of a sign-in and their limits, (account, address) first."""
        user, client = user_id.lower(), address_key(address)
        keys = [f"{self._prefix}fail:ua:{client}:{user}", f"{self._prefix}fail:a:{client}"]
        limits = [self.settings.max_failures, self.settings.max_failures_per_address]
        if self.settings.max_failures_per_account:
            keys.append(f"{self._prefix}fail:u:{user}")
            limits.append(self.settings.max_failures_per_account)
        return keys, limits

    async def verify(self, user_id: str, password: str, address: str) -> Account | None:
        """The account if the password is right, None if not (the attempt then stays
        counted); SignInThrottled if no attempt is left, before any password is checked."""
        keys, limits = self._counters(user_id, address)
        window = int(self.settings.failure_window * 1000)
        with redis_errors():
            wait_ms = int(await self._reserve(keys=keys, args=[window, *limits]))
        if wait_ms:
            raise SignInThrottled(
                "too many failed sign-ins; try again later", retry_after=wait_ms / 1000
            )
        try:
            account = await self._check(user_id, password)
        except ResourceExhausted:
            await self._give_back(keys, signed_in=False)  # the password was never checked
            raise
        if account is not None:
            await self._give_back(keys, signed_in=True)
        return account

    async def _give_back(self, keys: list[str], *, signed_in: bool) -> None:
        with redis_errors():
            await self._release(keys=keys, args=["1" if signed_in else "0"])

    async def _check(self, user_id: str, password: str) -> Account | None:
        with redis_errors():
            raw = await self._redis.get(self._user_key(user_id.lower()))
        record = json.loads(raw) if raw else None
        stored = record["hash"] if record else _DUMMY
        right = await self._hashes.run(lambda: _check_password(stored, password))
        if not right or record is None:
            return None
        return Account(
            user_id=user_id.lower(), org_id=record["org"], roles=frozenset(record["roles"])
        )

    def close(self) -> None:
        self._hashes.close()


async def _create_from_cli(argv: list[str] | None = None) -> int:
    """``python -m session_svc.accounts create --org O --user U [--roles r] [--password-stdin]``."""

    parser = argparse.ArgumentParser(prog="python -m session_svc.accounts")
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="create a user of an organization")
    create.add_argument("--org", required=True)
    create.add_argument("--user", required=True)
    create.add_argument("--roles", default="")
    create.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from standard input (default: generate one)",
    )
    create.add_argument("--if-missing", action="store_true", help="an existing user is no error")
    args = parser.parse_args(argv)
    password = (
        sys.stdin.readline().rstrip("\n") if args.password_stdin else secrets.token_urlsafe(12)
    )
    env = EnvReader(os.environ)
    client = connect_redis(RedisSettings.from_env(env, default_url=DEFAULT_REDIS_URL))
    try:
        account = await Accounts(client).create(
            org_id=args.org, user_id=args.user, password=password, roles=args.roles
        )
    except AlreadyExists as error:
        print(error.message, file=sys.stderr)
        return 0 if args.if_missing else 1
    except OpsmeshError as error:
        print(error.message, file=sys.stderr)
        return 2
    finally:
        await client.aclose()
    print(f"user {account.user_id} of org {account.org_id}")
    if not args.password_stdin:
        print(f"password: {password}")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(_create_from_cli()))
