"""What every servicer needs: the context type, id parsing and idempotency-key checks."""

from __future__ import annotations

import re
import uuid
from typing import TypeAlias

from grpc import aio

from mesh.errors import InvalidArgument

Context: TypeAlias = "aio.ServicerContext[object, object]"

# Keys are stored inside Redis key names and task records: bounded and printable.
MAX_IDEMPOTENCY_KEY = 128


_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def parse_uuid(value: str, field: str, *, kind: str = "UUID") -> str:
    """``value`` in canonical UUID form, or INVALID_ARGUMENT naming ``field``.

    ``kind`` is what the error calls the value ("task id", "notification id", ...).
    """
    if _CANONICAL_UUID.fullmatch(value) is not None:
        return value  # as ids are handed out: no UUID object to build and print again
    try:
        return str(uuid.UUID(value))
    except ValueError:
        # Only a prefix is echoed: the value comes from the client and may be huge.
        raise InvalidArgument(f"{field} {value[:64]!r} is not a {kind}", field=field) from None


def check_idempotency_key(key: str) -> None:
    """INVALID_ARGUMENT unless ``key`` is empty or a short printable string."""
    if len(key) > MAX_IDEMPOTENCY_KEY or not key.isprintable():
        raise InvalidArgument(
            f"idempotency_key must be at most {MAX_IDEMPOTENCY_KEY} printable characters",
            field="idempotency_key",
        )
