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
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio as aioredis
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from email_validator import EmailNotValidError, validate_email
from redis.exceptions import WatchError

from identity_svc.organizations import MEMBERSHIP_LUA, Memberships, join_roles
from identity_svc.passwords import check_password
from mesh.context import parse_identifier, parse_roles
from mesh.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    OpsmeshError,
    ResourceExhausted,
    Unauthenticated,
)
from mesh.redisconn import RedisSettings, connect_redis, redis_errors
from mesh.settings import integer, load, seconds

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

# Creates an account and its first membership in one step, or nothing: accounts.py's create and
# the invitation's acceptance (identity_svc/invitations.py) include this function in their
# scripts. An email key of '' means the account has no email.
CREATE_ACCOUNT_LUA = (
    MEMBERSHIP_LUA
    + """
local function create_account(prefix, user_key, email_key, record, user, org, roles, joined)
  if redis.call('EXISTS', user_key) == 1 then return 'user_taken' end
  if email_key ~= '' and redis.call('EXISTS', email_key) == 1 then return 'email_taken' end
  redis.call('SET', user_key, record)
  if email_key ~= '' then redis.call('SET', email_key, user) end
  put_member(prefix, org, user, roles, joined)
  return 'ok'
end
"""
)
# ARGV: prefix, user key, email key ('' for none), record, user, org, roles, joined (ms).
_CREATE = CREATE_ACCOUNT_LUA + "return create_account(unpack(ARGV))"


@dataclass(frozen=True, kw_only=True)
class SignInSettings:
    max_failures: int = integer("OPSMESH_LOGIN_MAX_FAILURES", 5, minimum=1, maximum=1000)
    """Per (account, client address) within the window."""
    max_failures_per_address: int = integer(
        "OPSMESH_LOGIN_MAX_FAILURES_PER_ADDRESS", 20, minimum=1, maximum=100_000
    )
    """Per client address (an IPv6 address counts as its /64), whatever the accounts."""
    max_failures_per_account: int = integer(
        "OPSMESH_LOGIN_MAX_FAILURES_PER_ACCOUNT", 100, minimum=0, maximum=1_000_000
    )
    """Per account from all addresses together; 0 turns this limit off."""
    failure_window: float = seconds("OPSMESH_LOGIN_FAILURE_WINDOW", 900.0, minimum=1, maximum=86400)
    hash_threads: int = integer(
        "OPSMESH_PASSWORD_HASH_THREADS",
        max(1, (os.cpu_count() or 2) // 2),
        minimum=1,
        maximum=64,
        doc="half the cores",
    )
    """Password checks running at once (argon2 uses ~64 MiB and a core each); half the
    cores by default, so that the event loop keeps a core while many users sign in."""
    hash_queue: int = integer("OPSMESH_PASSWORD_HASH_QUEUE", 16, minimum=0, maximum=10_000)
    """Password checks that may wait for a thread; more are refused (429)."""


@dataclass(frozen=True, slots=True)
class Account:
    user_id: str
    org_id: str
    """The organization a sign-in acts in: the account's first one while it is still a member
    there, else the first (by id) it belongs to; empty when it belongs to none."""
    roles: frozenset[str]
    """The account's roles in ``org_id`` (from its membership, so a role change shows here)."""
    email: str = ""
    """Where the account's emails go (password reset); empty for accounts made without one."""
    orgs: frozenset[str] = frozenset()
    """Every organization the account belongs to."""


@dataclass(frozen=True, kw_only=True, slots=True)
class NewAccount:
    """A validated account with its password hashed, not stored yet (``Accounts.prepare``)."""

    account: Account
    record: str
    """The stored JSON record."""


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


def _account(
    user_id: str, record: dict[str, Any], memberships: dict[str, frozenset[str]]
) -> Account:
    preferred = record["org"]
    org_id = preferred if preferred in memberships else min(memberships, default="")
    return Account(
        user_id=user_id.lower(),
        org_id=org_id,
        roles=memberships.get(org_id, frozenset()),
        email=record.get("email", ""),
        orgs=frozenset(memberships),
    )


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def parse_email(email: str) -> str:
    """An email address as stored (normalized), one notify_svc will send to; empty stays
    empty (an account without email gets no reset link)."""
    if not email.strip():
        return ""
    try:
        return validate_email(email.strip(), check_deliverability=False).normalized
    except EmailNotValidError as error:
        raise InvalidArgument(f"{email[:80]!r} is no email address: {error}") from None


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
        self._create = client.register_script(_CREATE)
        self.memberships = Memberships(client, prefix=prefix)

    def user_key(self, user_id: str) -> str:
        return f"{self._prefix}user:{user_id}"

    def email_key(self, email: str) -> str:
        """The email index key ('' for no email), for scripts that create accounts."""
        return f"{self._prefix}email:{email.casefold()}" if email else ""

    async def prepare(
        self, *, org_id: str, user_id: str, password: str, roles: str = "", email: str = ""
    ) -> NewAccount:
        """Validates an account (the password policy included) and hashes its password."""
        try:
            user = parse_identifier(user_id.lower(), "user")
            org = parse_identifier(org_id, "org")
            granted = parse_roles(roles)
        except Unauthenticated as error:
            raise InvalidArgument(error.message) from None
        account = Account(
            user_id=user, org_id=org, roles=granted, email=parse_email(email), orgs=frozenset({org})
        )
        check_password(password, user_id=account.user_id, email=account.email)
        hashed = await self._hashes.run(lambda: _HASHER.hash(password))
        # "org" is the organization sign-in prefers; the roles live in the memberships.
        record: dict[str, Any] = {"org": account.org_id, "hash": hashed, "m": 1}
        if account.email:
            record["email"] = account.email
        return NewAccount(account=account, record=json.dumps(record))

    def creation_args(self, new: NewAccount) -> list[str | int]:
        """ARGV of ``create_account`` (CREATE_ACCOUNT_LUA) for ``new``."""
        account = new.account
        return [
            self._prefix,
            self.user_key(account.user_id),
            self.email_key(account.email),
            new.record,
            account.user_id,
            account.org_id,
            join_roles(account.roles),
            int(time.time() * 1000),
        ]

    @staticmethod
    def creation_refused(outcome: str, account: Account) -> None:
        """Raises AlreadyExists for a refusal of ``create_account``."""
        if outcome == "email_taken":
            raise AlreadyExists(f"an account with the email {account.email} exists")
        if outcome == "user_taken":
            raise AlreadyExists(f"user {account.user_id} exists")

    async def create(
        self, *, org_id: str, user_id: str, password: str, roles: str = "", email: str = ""
    ) -> Account:
        """A new account, member of ``org_id`` with ``roles`` (account and membership are
        written in one step); AlreadyExists for a taken user name or email."""
        new = await self.prepare(
            org_id=org_id, user_id=user_id, password=password, roles=roles, email=email
        )
        with redis_errors():
            outcome = await self._create(keys=[], args=self.creation_args(new))
        self.creation_refused(_text(outcome), new.account)
        return new.account

    async def find_by_login(self, login: str) -> Account | None:
        """The account whose user name or email address ``login`` is, None if none is."""
        user_id = login.strip().lower()
        if "@" in user_id:
            with redis_errors():
                found = await self._redis.get(self.email_key(user_id))
            if found is None:
                return None
            user_id = found.decode() if isinstance(found, bytes) else str(found)
        return await self.find(user_id)

    async def set_password(self, user_id: str, password: str) -> None:
        """Replaces the account's password (the policy applies); NotFound without the account."""
        account = await self.find(user_id)
        if account is None:
            raise NotFound(f"no user {user_id}")
        check_password(password, user_id=account.user_id, email=account.email)
        hashed = await self._hashes.run(lambda: _HASHER.hash(password))

        def rehash(record: dict[str, Any], pipe: Any) -> bool:
            record["hash"] = hashed
            return True

        if not await self._rewrite(self.user_key(account.user_id), rehash):
            raise NotFound(f"no user {user_id}")

    async def reserve_attempts(self, keys: list[str], limits: list[int], *, window: float) -> float:
        """Takes one attempt from every counter in ``keys`` (each below its limit) or from
        none: 0 when taken, else the seconds until one is free. The sign-in counters'
        atomic script, for other flows that need the same kind of limit (password reset)."""
        with redis_errors():
            wait_ms = int(await self._reserve(keys=keys, args=[int(window * 1000), *limits]))
        return wait_ms / 1000

    async def find(self, user_id: str) -> Account | None:
        """The local account of ``user_id``, None if there is none (no password is checked)."""
        record, memberships = await self._load(user_id.lower())
        return None if record is None else _account(user_id, record, memberships)

    async def _load(self, user: str) -> tuple[dict[str, Any] | None, dict[str, frozenset[str]]]:
        """The account's record and memberships (an account from before memberships existed
        gets the one its record names, once)."""
        with redis_errors():
            raw = await self._redis.get(self.user_key(user))
        if not raw:
            return None, {}
        record: dict[str, Any] = json.loads(raw)
        if not record.get("m"):
            await self._adopt(user)
        return record, await self.memberships.of_user(user)

    async def _adopt(self, user: str) -> None:
        """Gives an account made before memberships existed the membership its record names,
        and marks the record, so that a later removal from that org stays a removal."""

        def adopt(record: dict[str, Any], pipe: Any) -> bool:
            if record.get("m"):
                return False
            roles = join_roles(frozenset(record.pop("roles", [])))
            record["m"] = 1
            pipe.hsetnx(self.memberships.members_key(record["org"]), user, roles)
            pipe.hsetnx(self.memberships.orgs_key(user), record["org"], roles)
            return True

        await self._rewrite(self.user_key(user), adopt)

    async def _rewrite(self, key: str, edit: Callable[[dict[str, Any], Any], bool]) -> bool:
        """Rewrites the account record at ``key`` with ``edit``, which may queue more commands
        on the transaction and returns False to leave the record as it is; False when there is
        no record. Optimistic: another change to the record (roles, memberships) between the
        read and the write makes this try again instead of overwriting it."""
        with redis_errors():
            async with self._redis.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        await pipe.watch(key)
                        raw = await pipe.get(key)
                        if not raw:
                            return False
                        record = json.loads(raw)
                        pipe.multi()  # type: ignore[no-untyped-call]
                        if edit(record, pipe):
                            pipe.set(key, json.dumps(record), keepttl=True)
                            await pipe.execute()
                        return True
                    except WatchError:
                        continue

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
        wait = await self.reserve_attempts(keys, limits, window=self.settings.failure_window)
        if wait:
            raise SignInThrottled("too many failed sign-ins; try again later", retry_after=wait)
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
        record, memberships = await self._load(user_id.lower())
        stored = record["hash"] if record else _DUMMY
        right = await self._hashes.run(lambda: _check_password(stored, password))
        if not right or record is None:
            return None
        return _account(user_id, record, memberships)

    def close(self) -> None:
        self._hashes.close()


async def _create_from_cli(argv: list[str] | None = None) -> int:
    """``python -m identity_svc.accounts create --org O --user U [--roles r] [--password-stdin]``
    (with ``--if-missing``, an existing user is no error)."""

    parser = argparse.ArgumentParser(prog="python -m identity_svc.accounts")
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="create a user of an organization")
    create.add_argument("--org", required=True)
    create.add_argument("--user", required=True)
    create.add_argument("--roles", default="")
    create.add_argument("--email", default="", help="where password reset emails go")
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
    client = connect_redis(load(RedisSettings, os.environ))
    try:
        account = await Accounts(client).create(
            org_id=args.org,
            user_id=args.user,
            password=password,
            roles=args.roles,
            email=args.email,
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
