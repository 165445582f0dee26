"""Operator commands for access tokens; they need the signing keys, so only an operator can.

    python -m identity_svc.tokens issue --user ada --org acme [--roles admin,ops] [--ttl 15m]
    python -m identity_svc.tokens rotate        # a new signing key; old ones stay published
    python -m identity_svc.tokens prune --older-than 1d

The keys directory and the issuer come from OPSMESH_JWT_KEYS_DIR and OPSMESH_JWT_ISSUER /
OPSMESH_JWT_AUDIENCE, as for the service.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from identity_svc.http import IssuerSettings
from identity_svc.keys import KeyRing, issue_access_token
from mesh.auth import AuthSettings
from mesh.context import Principal, parse_identifier, parse_roles
from mesh.errors import Unauthenticated
from mesh.settings import SettingsError, duration, load, nested


@dataclass(frozen=True, kw_only=True)
class _TokenSettings:
    """What the commands read: the service's own declarations of the keys and the issuer."""

    issuer: IssuerSettings = nested(IssuerSettings)
    auth: AuthSettings = nested(AuthSettings)

    def check(self, problems: list[str]) -> None:
        if not self.auth.issuer:
            problems.append("OPSMESH_JWT_ISSUER is required: the issuer the tokens name")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m identity_svc.tokens",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    issue = commands.add_parser("issue", help="print an access token for a user of an org")
    issue.add_argument("--user", required=True)
    issue.add_argument("--org", required=True)
    issue.add_argument("--roles", default="")
    issue.add_argument("--ttl", default="", help="lifetime, e.g. 15m (default: the service's)")
    commands.add_parser("rotate", help="add a signing key that signs from now on")
    prune = commands.add_parser("prune", help="remove keys older than a duration")
    prune.add_argument("--older-than", required=True)
    args = parser.parse_args(argv)
    overrides = {"OPSMESH_ACCESS_TOKEN_TTL": args.ttl} if getattr(args, "ttl", "") else {}
    try:
        settings = load(_TokenSettings, {**os.environ, **overrides})
    except SettingsError as error:
        print(error, file=sys.stderr)
        return 2
    ring = KeyRing.load_or_create(settings.issuer.keys_dir)
    if args.command == "rotate":
        key = ring.rotate()
        print(f"new signing key {key.kid} in {settings.issuer.keys_dir}")
        return 0
    if args.command == "prune":
        try:
            age = duration(args.older_than, minimum=0, maximum=10 * 365 * 86400)
        except ValueError as error:
            print(f"--older-than={args.older_than!r}: {error}", file=sys.stderr)
            return 2
        removed = ring.prune(time.time() - age)
        print(f"removed {len(removed)} key(s): {', '.join(removed) or '-'}")
        return 0
    try:
        principal = Principal(
            user_id=parse_identifier(args.user, "--user"),
            org_id=parse_identifier(args.org, "--org"),
            roles=parse_roles(args.roles),
        )
    except Unauthenticated as error:
        print(error.message, file=sys.stderr)
        return 2
    print(
        issue_access_token(
            ring,
            principal,
            issuer=settings.auth.issuer,
            audience=settings.auth.audience,
            ttl=settings.issuer.access_token_ttl,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
