"""The one password policy of local accounts: sign-up through an invitation, password reset
and the accounts command line all call :func:`check_password`.

A password is refused when it is

* shorter than :data:`MIN_PASSWORD` characters (length is what makes argon2id guesses
  expensive enough; 12 is NIST SP 800-63B's "at least 8" with a margin);
* the user name, the email address or its local part, or contains one of them;
* one of the 10,000 most common passwords (``data/common_passwords.txt``, where it came
  from is written at its top), also with digits or symbols around it (``password2024!``)
  or repeated (``qwertyqwerty``), compared without regard to case;
* made of fewer than :data:`MIN_DISTINCT` different characters (``aaaaaaaaaaaa``).

No rules about character classes: they push people to ``Password1!`` and do not stop
guessing (NIST SP 800-63B §5.1.1.2). The messages say what to change, never echo the password.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

from mesh.errors import InvalidArgument

MIN_PASSWORD = 12
"""Characters a password needs at least."""
MAX_PASSWORD = 256
"""More is refused: argon2 hashes anything, but a form field has no reason to be longer."""
MIN_DISTINCT = 5
"""Different characters a password needs at least."""
_MIN_NAME = 3
"""A user name or email local part shorter than this is not looked for inside passwords."""
# Digits, punctuation and spaces people put around a common word to pass a length rule.
_PADDING = re.compile(r"^[\W\d_]+|[\W\d_]+$")


class WeakPassword(InvalidArgument):
    """The password does not meet the policy; the message says why, for the person typing it."""


@cache
def common_passwords() -> frozenset[str]:
    """The shipped list of common passwords, lower case."""
    text = resources.files("identity_svc").joinpath("data/common_passwords.txt").read_text()
    return frozenset(
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    )


def check_password(password: str, *, user_id: str = "", email: str = "") -> None:
    """Nothing if ``password`` meets the policy for this account; WeakPassword (an
    InvalidArgument, so gRPC callers answer INVALID_ARGUMENT) with a clear message if not."""
    if len(password) < MIN_PASSWORD:
        raise WeakPassword(f"A password needs at least {MIN_PASSWORD} characters.")
    if len(password) > MAX_PASSWORD:
        raise WeakPassword(f"A password may have at most {MAX_PASSWORD} characters.")
    folded = password.casefold()
    for name in _personal_words(user_id, email):
        if name in folded:
            raise WeakPassword("A password must not contain your user name or email address.")
    if _is_common(folded):
        raise WeakPassword(
            "This password is one of the most common ones, which are guessed first; "
            "choose another (a few unrelated words make a good one)."
        )
    if len(set(folded)) < MIN_DISTINCT:
        raise WeakPassword(f"A password needs at least {MIN_DISTINCT} different characters.")


def _personal_words(user_id: str, email: str) -> list[str]:
    local, _, _ = email.casefold().partition("@")
    words = [user_id.casefold(), email.casefold(), local]
    return [word for word in words if len(word) >= _MIN_NAME]


def _is_common(folded: str) -> bool:
    common = common_passwords()
    if folded in common:
        return True
    core = _PADDING.sub("", folded)
    if core in common:
        return True
    # One short common password typed again and again: "qwertyqwerty", "abc123abc123abc123".
    for size in range(1, len(core) // 2 + 1):
        if len(core) % size == 0 and core[:size] * (len(core) // size) == core:
            return core[:size] in common or size < MIN_DISTINCT
    return False
