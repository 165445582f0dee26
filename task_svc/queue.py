"""The JetStream side of tasks: the work stream, the records bucket, and publishing."""

from __future__ import annotations

import json
from dataclasses import dataclass

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


@dataclass(frozen=True, slots=True)
class WorkItem:
    """What a work message carries: where the record is. The record is the truth."""

    org_id: str
    task_id: str
    generation: int

    def encode(self) -> bytes:
        return json.dumps(
            {"org_id": self.org_id, "task_id": self.task_id, "generation": self.generation}
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> WorkItem:
        raw = json.loads(data)
        return cls(org_id=raw["org_id"], task_id=raw["task_id"], generation=int(raw["generation"]))

    @property
    def message_id(self) -> str:
        # A resubmitted task (RetryTask) gets a new generation, so it is not taken as a duplicate.
        return f"{self.task_id}:{self.generation}"


async def ensure_topology(js: JetStreamContext, topology: Topology) -> KeyValue:
    """Creates (or updates) the work stream and the records bucket; returns the bucket."""
    with nats_errors():
        config = StreamConfig(
            name=topology.stream,
            subjects=[f"{topology.namespace}.tasks.work.>"],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            duplicate_window=DUPLICATE_WINDOW_SECONDS,
        )
        try:
            await js.add_stream(config)
        except nats.js.errors.BadRequestError:
            await js.update_stream(config)
        try:
            return await js.key_value(topology.bucket)
        except nats.js.errors.BucketNotFoundError:
            return await js.create_key_value(
                KeyValueConfig(bucket=topology.bucket, history=1, storage=StorageType.FILE)
            )


class Publisher:
    def __init__(self, js: JetStreamContext, topology: Topology, *, timeout: float) -> None:
        self._js = js
        self._topology = topology
        self._timeout = timeout

    async def publish(self, task: task_pb2.Task, generation: int) -> None:
        item = WorkItem(org_id=task.org_id, task_id=task.id, generation=generation)
        with nats_errors():
            await self._js.publish(
                self._topology.subject(task.type),
                item.encode(),
                timeout=self._timeout,
                stream=self._topology.stream,
                headers={"Nats-Msg-Id": item.message_id},
            )
