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
compare-and-remove sent without waiting for an answer (one message, no round
trip). A marker that changed since (RetryTask reopened the task, the reaper
turned it to "queued") is left alone, and so is one whose removal got lost:
the reaper removes the markers of final tasks it finds, as before; it is only
no longer the one who removes them all (a get and a delete per finished task,
one at a time, cost a reaper pass more CPU than the worker spent running them).

Markers are removed from the bucket's stream without a tombstone
(task_svc/bucketstream.py): a KV delete's tombstone stays for the retention
period, and the reaper's walk would grow with every task ever finished in it.
A pass removes the tombstones it still finds (written by earlier versions).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import nats.js.errors

from mesh.natsconn import nats_errors
from opsmesh.task.v1 import task_pb2
from task_svc.bucketstream import BucketStream
from task_svc.store import TaskStore

PUBLISH = "publish"
QUEUED = "queued"
_PREFIX = "o"


def marker_key(org_id: str, task_id: str) -> str:
    return f"{_PREFIX}.{org_id.encode().hex()}.{task_id}"


async def close_unconfirmed(bucket: BucketStream, org_id: str, task_id: str, revision: int) -> None:
    """Removes revision ``revision`` of a final task's marker, without waiting for an answer.

    A compare-and-remove published with no reply subject: JetStream removes the marker only
    while ``revision`` is still its last, and answers nothing either way, so it costs one
    outgoing message. Whatever becomes of it, the reaper removes a final task's marker it
    still finds.
    """
    await bucket.remove_unconfirmed(marker_key(org_id, task_id), up_to=revision)


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
        """Removes the marker of a final (or never recorded) task, unless it changed meanwhile
        (RetryTask reopened it: the next pass looks again)."""
        await self._bucket.remove(marker_key(marker.org_id, marker.task_id), up_to=marker.revision)

    async def discard(self, task: task_pb2.Task) -> None:
        await self._bucket.remove(marker_key(task.org_id, task.id))

    async def listing(self) -> list[Marker]:
        """Every marker, as of now; the tombstones met on the way are removed."""
        markers: list[Marker] = []
        for entry in await self._bucket.entries(self._kv, f"{_PREFIX}.*.*"):
            if entry.operation is not None:
                if entry.revision:
                    await self._bucket.remove_unconfirmed(entry.key, up_to=entry.revision)
                continue
            marker = _parse(entry.key, entry.value or b"", entry.revision or 0)
            if marker is not None:
                markers.append(marker)
        return markers
