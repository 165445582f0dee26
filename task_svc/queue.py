"""The JetStream side of tasks: the work stream, the records bucket, and publishing."""

from __future__ import annotations

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import (
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.kv import KeyValue

from mesh.natsconn import nats_errors
from opsmesh.task.v1 import task_pb2
from task_svc.config import Topology

# Publishes with the same Nats-Msg-Id inside this window are stored once.
DUPLICATE_WINDOW_SECONDS = 120.0


REVISION_HEADER = "Opsmesh-Revision"
MARKER_HEADER = "Opsmesh-Marker"
"""The revision of the task's open-task marker written with the message (task_svc/outbox.py);
the worker that finishes the task removes that revision. Absent: the reaper removes it."""


def message_id(task: task_pb2.Task, *, resend: int = 0) -> str:
    # A resubmitted task (RetryTask) has a new version, so it is not taken as a duplicate.
    base = f"{task.id}:{task.version}"
    return f"{base}:resend-{resend}" if resend else base


async def ensure_topology(js: JetStreamContext, topology: Topology) -> KeyValue:
    """Creates (or updates) the work stream and the records bucket; returns the bucket."""
    with nats_errors():
        config = StreamConfig(
            name=topology.stream,
            subjects=[f"{topology.namespace}.tasks.work.>"],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            duplicate_window=DUPLICATE_WINDOW_SECONDS,
            num_replicas=topology.replicas,
        )
        try:
            await js.add_stream(config)
        except nats.js.errors.BadRequestError:
            await js.update_stream(config)
        try:
            return await js.key_value(topology.bucket)
        except nats.js.errors.BucketNotFoundError:
            return await js.create_key_value(
                KeyValueConfig(
                    bucket=topology.bucket,
                    history=1,
                    storage=StorageType.FILE,
                    ttl=topology.retention,
                    replicas=topology.replicas,
                )
            )


class Publisher:
    def __init__(self, js: JetStreamContext, topology: Topology, *, timeout: float) -> None:
        self._js = js
        self._topology = topology
        self.timeout = timeout

    async def publish(
        self, task: task_pb2.Task, revision: int, *, marker: int = 0, resend: int = 0
    ) -> None:
        """Queues ``task``; the message carries the record as of ``revision``, and ``marker``,
        the revision of the task's open-task marker (0: none to name).

        The worker starts from that copy and its compare-and-set tells it whether the
        record moved on since (then it reads the record, the truth, again). ``resend``
        (non-zero) gives the message an id of its own, for a message known to be gone that
        JetStream would otherwise drop as a duplicate of it.
        """
        headers = {"Nats-Msg-Id": message_id(task, resend=resend), REVISION_HEADER: str(revision)}
        if marker:
            headers[MARKER_HEADER] = str(marker)
        with nats_errors():
            await self._js.publish(
                self._topology.subject(task.type),
                task.SerializeToString(),
                timeout=self.timeout,
                stream=self._topology.stream,
                headers=headers,
            )
