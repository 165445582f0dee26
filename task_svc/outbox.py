"""Open-task markers: the outbox between a task's record and its work message.

Every task that is not final has a marker ``o.<org>.<task id>`` in the records
bucket. The service writes it, saying "publish", *before* the record, and turns
it to "queued" once the work message is stored; RetryTask and the reaper's
takeovers do the same. A crash between writing the record and publishing thus
leaves a "publish" marker, and the reaper publishes the task after a short
grace (with the same message id, so a publish that did happen is de-duplicated
by JetStream). The markers are also the reaper's index of unfinished tasks:
it walks them instead of every record kept for the retention period.

A task's work message names the revision of the marker written with it, and
the worker that records the task as final removes that marker revision with a
compare-and-delete sent without waiting for an answer (one message, no round
trip). A marker that changed since (RetryTask reopened the task, the reaper
turned it to "queued") is left alone, and so is one whose removal got lost:
the reaper removes the markers of final tasks it finds, as before; it is only
no longer the one who removes them all (a get and a delete per finished task,
one at a time, cost a reaper pass more CPU than the worker spent running them).

A delete leaves a tombstone for the bucket's retention (30 days), and the
reaper's walk meets every one of them (20,000 cost a pass 0.73 s), so a walk
that meets ``sweep_after`` tombstones sweeps them with one purge of the marker
subjects below a cut (task_svc/bucketstream.py). Live markers below the cut are
written again first (same value, new revision), at most ``_SWEEP_REWRITES`` of
them: the cut stops below the oldest live marker past that budget. A rewritten
marker no longer matches the revision its work message names, so the reaper,
not the worker, removes it once the task is final.
"""

from __future__ import annotations

import time
from contextlib import suppress
from dataclasses import dataclass, field

import nats.js.errors
from nats.js.kv import KeyValue

from mesh.natsconn import nats_errors
from opsmesh.task.v1 import task_pb2
from task_svc.bucketstream import BucketStream
from task_svc.store import TaskStore

PUBLISH = "publish"
QUEUED = "queued"
_PREFIX = "o"
# JetStream's error code for a failed expected-last-sequence check (a delete that lost a race).
_WRONG_LAST_SEQUENCE = 10071
# Live markers a sweep writes again so that its cut can pass them.
_SWEEP_REWRITES = 100


def marker_key(org_id: str, task_id: str) -> str:
    return f"{_PREFIX}.{org_id.encode().hex()}.{task_id}"


async def close_unconfirmed(bucket: BucketStream, org_id: str, task_id: str, revision: int) -> None:
    """Removes revision ``revision`` of a final task's marker, without waiting for an answer.

    Whatever becomes of it, the reaper removes a final task's marker it still finds.
    """
    await bucket.delete_unconfirmed(marker_key(org_id, task_id), last=revision)


@dataclass(frozen=True)
class Marker:
    org_id: str
    task_id: str
    state: str
    since: float
    """Unix time the marker took its state."""
    revision: int

    @property
    def queued(self) -> bool:
        return self.state == QUEUED

    def age(self) -> float:
        return time.time() - self.since


def _parse(key: str, value: bytes, revision: int) -> Marker | None:
    try:
        _, org_hex, task_id = key.split(".", 2)
        state, since = value.decode().split(" ", 1)
        return Marker(bytes.fromhex(org_hex).decode(), task_id, state, float(since), revision)
    except ValueError:
        return None  # not a marker this code wrote: left alone


class OpenTasks:
    def __init__(self, store: TaskStore) -> None:
        self._kv = store.kv  # markers live in the records bucket
        self._bucket = store.bucket_stream

    async def publishing(self, task: task_pb2.Task) -> int:
        """Marks the task as about to be published (before its record is written or changed);
        the marker's revision, which the work message carries."""
        return await self._put(task, PUBLISH)

    async def queued(self, task: task_pb2.Task) -> int:
        """Marks the task's work message as stored."""
        return await self._put(task, QUEUED)

    async def _put(self, task: task_pb2.Task, state: str) -> int:
        with nats_errors():
            return await self._kv.put(
                marker_key(task.org_id, task.id), f"{state} {time.time():.3f}".encode()
            )

    async def requeued(self, marker: Marker) -> bool:
        """Turns ``marker`` to queued unless it changed since it was read; False if it had."""
        value = f"{QUEUED} {time.time():.3f}".encode()
        with nats_errors():
            try:
                await self._kv.update(
                    marker_key(marker.org_id, marker.task_id), value, last=marker.revision
                )
            except nats.js.errors.KeyWrongLastSequenceError:
                return False
        return True

    async def close(self, marker: Marker) -> None:
        """Removes the marker of a final (or never recorded) task, unless it changed meanwhile."""
        with nats_errors():
            try:
                await self._kv.delete(
                    marker_key(marker.org_id, marker.task_id), last=marker.revision
                )
            except nats.js.errors.APIError as error:
                if error.err_code != _WRONG_LAST_SEQUENCE:
                    raise
                # Reopened meanwhile (RetryTask): the next pass looks again.

    async def discard(self, task: task_pb2.Task) -> None:
        with nats_errors():
            await self._kv.purge(marker_key(task.org_id, task.id))

    async def listing(self) -> list[Marker]:
        """Every marker, as of now."""
        return (await self.survey()).markers

    async def survey(self) -> Survey:
        """Every marker and every tombstone of one, as of now."""
        survey = Survey()
        for entry in await self._bucket.entries(self._kv, f"{_PREFIX}.*.*"):
            survey.last_revision = max(survey.last_revision, entry.revision or 0)
            if entry.operation is not None:
                survey.tombstones.append(entry.revision or 0)
                continue
            survey.live.append(entry)
        return survey

    async def sweep(self, survey: Survey) -> int:
        """Removes the tombstones ``survey`` found below a cut; how many.

        Safe against any writer: every marker written since the survey has a revision past
        the cut, and each live one below it is written again (or changed by someone else)
        before the purge. A rewrite that fails for any other reason leaves the purge undone.
        """
        live = sorted(survey.live, key=lambda entry: entry.revision or 0)
        if len(live) > _SWEEP_REWRITES:
            cut, live = live[_SWEEP_REWRITES].revision or 0, live[:_SWEEP_REWRITES]
        else:
            cut = survey.last_revision + 1
        below = sum(1 for revision in survey.tombstones if revision < cut)
        if not below:
            return 0
        for entry in live:
            # A marker changed since the survey has a revision past the cut already.
            with nats_errors(), suppress(nats.js.errors.KeyWrongLastSequenceError):
                await self._kv.update(entry.key, entry.value or b"", last=entry.revision)
        await self._bucket.remove(f"{_PREFIX}.>", up_to=cut - 1)
        return below


@dataclass
class Survey:
    live: list[KeyValue.Entry] = field(default_factory=list)
    """Every live marker's entry, including values this code could not parse."""
    tombstones: list[int] = field(default_factory=list)
    """The revision of every tombstone."""
    last_revision: int = 0

    @property
    def markers(self) -> list[Marker]:
        """The live markers this code wrote."""
        parsed = (_parse(entry.key, entry.value or b"", entry.revision or 0) for entry in self.live)
        return [marker for marker in parsed if marker is not None]
