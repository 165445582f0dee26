"""The audit log of an organization: who changed what about its members, and when.

One capped Redis stream per organization (``{prefix}audit:<org>``, the latest ``MAX_EVENTS``
kept), written by the invitation and membership flows (and password reset); the org's admins
read it through OrganizationService.ListAuditEvents, newest first. Stream ids order events by
time, so an id is also the page cursor.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from mesh.redisconn import redis_errors

MAX_EVENTS = 10_000
SYSTEM_ACTOR = "system"
"""The actor of changes nobody made directly (e.g. a member added at account creation)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class AuditEvent:
    event_id: str
    time: float
    """Seconds since the epoch."""
    actor: str
    action: str
    target: str
    details: Mapping[str, str] = field(default_factory=dict)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class AuditLog:
    def __init__(self, client: aioredis.Redis, *, prefix: str = "opsmesh:id:") -> None:
        self._redis = client
        self._prefix = prefix

    def _key(self, org_id: str) -> str:
        return f"{self._prefix}audit:{org_id}"

    async def record(
        self,
        org_id: str,
        *,
        actor: str,
        action: str,
        target: str,
        details: Mapping[str, str] | None = None,
    ) -> str:
        """Appends one event and returns its id; the oldest events beyond MAX_EVENTS go."""
        fields = {
            "at": str(int(time.time() * 1000)),
            "actor": actor,
            "action": action,
            "target": target,
            "details": json.dumps(dict(details or {}), sort_keys=True),
        }
        with redis_errors():
            event_id = await self._redis.xadd(
                self._key(org_id),
                fields,  # type: ignore[arg-type]
                maxlen=MAX_EVENTS,
                approximate=True,
            )
        return _text(event_id)

    async def page(self, org_id: str, *, before: str | None, limit: int) -> list[AuditEvent]:
        """Up to ``limit`` events older than the event id ``before`` (None: the newest)."""
        upper = f"({before}" if before else "+"
        with redis_errors():
            entries = await self._redis.xrevrange(self._key(org_id), upper, "-", count=limit)
        events = []
        for event_id, raw in entries or []:
            if event_id is None or raw is None:
                continue
            data = {_text(k): _text(v) for k, v in raw.items()}
            details = json.loads(data.get("details") or "{}")
            events.append(
                AuditEvent(
                    event_id=_text(event_id),
                    time=int(data.get("at", "0")) / 1000,
                    actor=data.get("actor", ""),
                    action=data.get("action", ""),
                    target=data.get("target", ""),
                    details={str(k): str(v) for k, v in details.items()},
                )
            )
        return events
