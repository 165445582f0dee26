"""Opaque page tokens and page-size rules shared by every list RPC."""

from __future__ import annotations

import base64
import binascii
import json

from mesh.errors import InvalidArgument


def page_size(requested: int, *, default: int, maximum: int, field: str = "page_size") -> int:
    """AIP-158 semantics: 0 means the default; above the maximum is clamped."""
    if requested < 0:
        raise InvalidArgument(f"{field} must not be negative", field=field)
    if requested == 0:
        return default
    return min(requested, maximum)


def encode_token(kind: str, cursor: str) -> str:
    """A page token for ``cursor``; ``kind`` keeps tokens of different lists apart."""
    raw = json.dumps({"k": kind, "c": cursor}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str, kind: str, *, field: str = "page_token") -> str | None:
    """The cursor in ``token``, None for an empty token; INVALID_ARGUMENT if it is not ours."""
    if not token:
        return None
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
    except (ValueError, binascii.Error, UnicodeError):
        data = None
    if not isinstance(data, dict) or data.get("k") != kind or not isinstance(data.get("c"), str):
        raise InvalidArgument("page_token is not a token returned by this list", field=field)
    cursor: str = data["c"]
    return cursor
