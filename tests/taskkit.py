"""Test kit for the task service: a scripted handler, stacks of service + workers."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from grpc import aio
from nats.aio.client import Client
from prometheus_client import CollectorRegistry

from mesh.natsconn import NatsSettings, connect_nats
from mesh.server import ServiceRunner
from mesh.settings import ServerSettings
from opsmesh.task.v1 import task_pb2, task_pb2_grpc
from task_svc.config import RetryPolicy, TaskSettings, Topology, WorkerSettings
from task_svc.handlers import PermanentError, TaskContext
from task_svc.server import build_runner
from task_svc.store import TaskStore
from task_svc.worker import Worker, reaper_for
from tests.conftest import FAST_HEALTH

EMAIL = task_pb2.TASK_TYPE_EMAIL
WORKSPACE = task_pb2.TASK_TYPE_WORKSPACE


def retry_policies(max_attempts: int = 3) -> dict[int, RetryPolicy]:
    policy = RetryPolicy(max_attempts=max_attempts, backoff_base=0.05, backoff_cap=0.2)
    return {EMAIL: policy, WORKSPACE: policy}


@dataclass
class Script:
    """How the scripted handler treats one task (keyed by the email payload's notification id)."""

    transient_failures: int = 0
    permanent: bool = False
    always_fail: bool = False
    steps: int = 0
    step_seconds: float = 0.0
    release: asyncio.Event | None = None


@dataclass
class ScriptedHandler:
    scripts: dict[str, Script] = field(default_factory=dict)
    calls: Counter[str] = field(default_factory=Counter)
    effects: Counter[str] = field(default_factory=Counter)
    started: dict[str, asyncio.Event] = field(default_factory=dict)

    def started_event(self, notification_id: str) -> asyncio.Event:
        return self.started.setdefault(notification_id, asyncio.Event())

    async def __call__(self, context: TaskContext) -> None:
        key = context.task.payload["notification_id"]
        self.calls[key] += 1
        self.started_event(key).set()
        script = self.scripts.get(key, Script())
        for step in range(script.steps):
            await context.progress(f"step {step + 1}", step, script.steps)
            await asyncio.sleep(script.step_seconds)
        if script.release is not None:
            await script.release.wait()
        if script.permanent:
            raise PermanentError("the recipient does not exist")
        if script.always_fail or self.calls[key] <= script.transient_failures:
            raise ConnectionError(f"smtp down (call {self.calls[key]})")
        # An idempotent effect: done once per task whatever the deliveries.
        self.effects[context.task.id] = 1


@dataclass
class TaskStack:
    runner: ServiceRunner
    stub: task_pb2_grpc.TaskServiceStub
    channel: aio.Channel
    topology: Topology
    nats_url: str


@asynccontextmanager
async def task_stack(nats_url: str, *, max_attempts: int = 3) -> AsyncIterator[TaskStack]:
    topology = Topology(namespace=f"t{uuid.uuid4().hex[:10]}")
    settings = TaskSettings(
        server=ServerSettings(port=0, grace_period=1.0),
        nats=NatsSettings(url=nats_url, request_timeout=1.0, connect_timeout=1.0),
        topology=topology,
        retry=retry_policies(max_attempts),
    )
    runner = await build_runner(settings, options=FAST_HEALTH)
    await runner.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel:
            yield TaskStack(
                runner, task_pb2_grpc.TaskServiceStub(channel), channel, topology, nats_url
            )
    finally:
        await runner.stop()


@asynccontextmanager
async def running_worker(
    stack: TaskStack,
    handler: object,
    *,
    types: tuple[int, ...] = (EMAIL,),
    max_attempts: int = 3,
    concurrency: int = 4,
    ack_wait: float = 5.0,
    grace: float = 2.0,
    worker_id: str = "w1",
    lease_ttl: float = 5.0,
    reap_interval: float | None = None,
) -> AsyncIterator[Worker]:
    """A worker in this process; with ``reap_interval``, running its reaper too."""
    client: Client = await connect_nats(NatsSettings(url=stack.nats_url), name=worker_id)
    js = client.jetstream(timeout=2.0)
    store = await TaskStore.open(client, js, stack.topology, request_timeout=2.0)
    settings = WorkerSettings(
        nats=NatsSettings(url=stack.nats_url, request_timeout=2.0),
        topology=stack.topology,
        retry=retry_policies(max_attempts),
        worker_id=worker_id,
        concurrency=concurrency,
        ack_wait=ack_wait,
        lease_ttl=lease_ttl,
        reap_interval=reap_interval or 1.0,
        outbox_grace=0.5,
        server=ServerSettings(port=0, grace_period=grace),
    )
    handlers: dict[int, Any] = dict.fromkeys(types, handler)
    registry = CollectorRegistry()
    reaper = (
        None
        if reap_interval is None
        else reaper_for(client, js, store, settings, handlers, registry)
    )
    worker = Worker(
        js=js,
        store=store,
        settings=settings,
        handlers=handlers,
        registry=registry,
        reaper=reaper,
    )
    await worker.start()
    try:
        yield worker
    finally:
        await worker.stop()
        await client.close()


@asynccontextmanager
async def task_store(stack: TaskStack) -> AsyncIterator[TaskStore]:
    """Direct access to the stack's records bucket, to stage what a crash leaves behind."""
    client: Client = await connect_nats(NatsSettings(url=stack.nats_url), name="staging")
    try:
        yield await TaskStore.open(
            client, client.jetstream(timeout=2.0), stack.topology, request_timeout=2.0
        )
    finally:
        await client.close()


def abandon(task: task_pb2.Task) -> None:
    """Makes ``task`` look run by a worker that died: running, its attempt's lease lapsed."""
    task.status = task_pb2.TASK_STATUS_RUNNING
    attempt = task.attempts.add(number=len(task.attempts) + 1, worker="dead")
    attempt.started_at.GetCurrentTime()
    attempt.lease_expires_at.GetCurrentTime()
