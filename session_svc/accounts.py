"""Local accounts: users of organizations, passwords hashed with argon2id, in Redis.

Failed logins are counted per user and per client address; past the limit a
login is refused until the window passes, whatever the password.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
from dataclasses import dataclass

import redis.asyncio as aioredis
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from mesh.context import parse_identifier, parse_roles
from mesh.errors import AlreadyExists, InvalidArgument, OpsmeshError, Unauthenticated
from mesh.redisconn import RedisSettings, connect_redis, redis_errors
from mesh.settings import EnvReader

MIN_PASSWORD = 12
_HASHER = PasswordHasher()  # argon2id with the library's current recommended parameters
# Verified against when the user does not exist, so both paths cost the same.
_DUMMY = _HASHER.hash("opsmesh-no-such-user")


@dataclass(frozen=True, slots=True)
class Account:
    user_id: str
    org_id: str
    roles: frozenset[str]


class Accounts:
    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str = "opsmesh:id:",
        max_failures: int = 5,
        failure_window: float = 900.0,
    ) -> None:
        self._redis = client
        self._prefix = prefix
        self._max_failures = max_failures
        self._window_ms = int(failure_window * 1000)

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
        record = json.dumps(
            {"org": account.org_id, "roles": sorted(account.roles), "hash": _HASHER.hash(password)}
        )
        with redis_errors():
            created = await self._redis.set(self._user_key(account.user_id), record, nx=True)
        if not created:
            raise AlreadyExists(f"user {account.user_id} exists")
        return account

    async def locked(self, user_id: str, address: str) -> float:
        """Seconds until another login may be tried (0: now)."""
        keys = [f"{self._prefix}fail:u:{user_id.lower()}", f"{self._prefix}fail:a:{address}"]
        with redis_errors():
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.get(key)
                    pipe.pttl(key)
                replies = await pipe.execute()
        wait = 0.0
        for count, ttl in zip(replies[::2], replies[1::2], strict=True):
            if count is not None and int(count) >= self._max_failures:
                wait = max(wait, max(int(ttl), 1000) / 1000)
        return wait

    async def _failed(self, user_id: str, address: str) -> None:
        with redis_errors():
            async with self._redis.pipeline(transaction=True) as pipe:
                for key in (
                    f"{self._prefix}fail:u:{user_id.lower()}",
                    f"{self._prefix}fail:a:{address}",
                ):
                    pipe.incr(key)
                    pipe.pexpire(key, self._window_ms, nx=True)
                await pipe.execute()

    async def verify(self, user_id: str, password: str, address: str) -> Account | None:
        """The account if the password is right (and a failure is counted if not)."""
        with redis_errors():
            raw = await self._redis.get(self._user_key(user_id.lower()))
        record = json.loads(raw) if raw else None
        try:
            _HASHER.verify(record["hash"] if record else _DUMMY, password)
        except (VerificationError, InvalidHashError):
            await self._failed(user_id, address)
            return None
        if record is None:
            await self._failed(user_id, address)
            return None
        return Account(
            user_id=user_id.lower(), org_id=record["org"], roles=frozenset(record["roles"])
        )


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
    client = connect_redis(RedisSettings.from_env(env, default_url="redis://127.0.0.1:16379/0"))
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
