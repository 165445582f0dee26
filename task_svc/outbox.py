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
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import nats.js.errors
from nats.aio.client import Client
from nats.js.api import Header
from nats.js.kv import KeyValue

from mesh.natsconn import nats_errors
from opsmesh.task.v1 import task_pb2
from task_svc.keyindex import KeyIndex

PUBLISH = "publish"
QUEUED = "queued"
_PREFIX = "o"
# JetStream's error code for a failed expected-last-sequence check (a delete that lost a race).
_WRONG_LAST_SEQUENCE = 10071
# How a key-value delete is written (nats.js.kv's own header and value).
_KV_OPERATION = "KV-Operation"
_KV_DELETE = "DEL"


def marker_key(org_id: str, task_id: str) -> str:
    return f"{_PREFIX}.{org_id.encode().hex()}.{task_id}"


async def close_unconfirmed(
    nc: Client, bucket: str, org_id: str, task_id: str, revision: int
) -> None:
    """Removes revision ``revision`` of a final task's marker, without waiting for an answer.

    A compare-and-delete published with no reply subject: JetStream stores it only while
    ``revision`` is still the marker's last, and answers nothing either way, so it costs one
    outgoing message. Whatever becomes of it, the reaper removes a final task's marker it
    still finds.
    """
    await nc.publish(
        f"$KV.{bucket}.{marker_key(org_id, task_id)}",
        b"",
        headers={_KV_OPERATION: _KV_DELETE, Header.EXPECTED_LAST_SUBJECT_SEQUENCE: str(revision)},
    )


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
    def __init__(self, kv: KeyValue, index: KeyIndex) -> None:
        self._kv = kv
        self._index = index

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
        entries = await self._index.entries(self._kv, f"{_PREFIX}.*.*")
        markers = (_parse(entry.key, entry.value or b"", entry.revision or 0) for entry in entries)
        return [marker for marker in markers if marker is not None]
