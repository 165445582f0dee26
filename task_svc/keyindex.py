"""The keys a key-value bucket holds under a pattern, read from its stream's subject index.

A KV watch (what ``KeyValue.keys`` runs too) cannot list keys reliably: nats.py
ends the initial values with a marker it queues *before* the values when the
server delivered them before answering its consumer-info request, and one listing
in about 500 of a bucket with one key came back empty (ListTasks showed no task
right after PublishWorkspaceTask). The stream's subject index has no such race:
``STREAM.INFO`` with a ``subjects_filter`` names every subject holding a message,
up to 100,000 per answer, paged by offset; nothing is created on the server.

It also names deleted and purged keys (their tombstone is a message), so a
caller reading the values skips keys that turn out to be gone.
"""

from __future__ import annotations

import json

import nats.js.errors
from nats.aio.client import Client

from mesh.natsconn import nats_errors

# The JetStream API's subject prefix; opsmesh runs JetStream without a domain.
_API = "$JS.API"


class KeyIndex:
    def __init__(self, nc: Client, bucket: str, *, timeout: float) -> None:
        self._nc = nc
        self._subject_prefix = f"$KV.{bucket}."
        self._info = f"{_API}.STREAM.INFO.KV_{bucket}"
        self._timeout = timeout

    async def keys(self, pattern: str) -> list[str]:
        """Every key matching ``pattern`` (NATS wildcards) that holds a message, unordered."""
        keys: list[str] = []
        while True:
            subjects, total = await self._page(pattern, offset=len(keys))
            keys.extend(subject[len(self._subject_prefix) :] for subject in subjects)
            if not subjects or len(keys) >= total:
                return keys

    async def _page(self, pattern: str, *, offset: int) -> tuple[list[str], int]:
        request = {"subjects_filter": self._subject_prefix + pattern, "offset": offset}
        with nats_errors():
            reply = await self._nc.request(
                self._info, json.dumps(request).encode(), timeout=self._timeout
            )
            answer = json.loads(reply.data)
            if "error" in answer:
                # Raised inside nats_errors, so "JetStream unavailable" becomes UNAVAILABLE.
                nats.js.errors.APIError.from_error(answer["error"])
        subjects = list((answer.get("state") or {}).get("subjects") or {})
        return subjects, int(answer.get("total") or len(subjects))
