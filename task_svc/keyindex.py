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

Values in bulk still come fastest from a watch, which streams them: ``entries``
asks the index first whether anything matches, and then ends the watch on the
first value the server sent with nothing left pending, never on nats.py's marker.
"""

from __future__ import annotations

import json

import nats.js.errors
from nats.aio.client import Client
from nats.js.kv import KeyValue

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

    async def entries(self, kv: KeyValue, pattern: str) -> list[KeyValue.Entry]:
        """The current value of every key of ``kv`` matching ``pattern``; removed keys left out.

        ``kv`` must be this index's bucket.
        """
        if not await self.keys(pattern):
            return []
        latest: dict[str, KeyValue.Entry] = {}
        with nats_errors():
            watcher = await kv.watch(pattern)
            try:
                while True:
                    entry = await watcher.updates(timeout=self._timeout)  # type: ignore[no-untyped-call]
                    if entry is None:  # nats.py's end marker: it may come before the values
                        continue
                    if entry.operation is None:
                        latest[entry.key] = entry
                    else:  # deleted or purged since the index was read
                        latest.pop(entry.key, None)
                    if entry.delta == 0:
                        return list(latest.values())
            finally:
                await watcher.stop()  # type: ignore[no-untyped-call]

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
