"""The task system under faults: killed workers, NATS restarts, NATS down."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import nats
import pytest
import redis.asyncio as aioredis
from google.protobuf import struct_pb2
from grpc import aio

from devtools.servers import ManagedProcess, NatsServer, RedisServer, free_port
from mesh.redisconn import RedisSettings
from mesh.settings import ServerSettings
from notify_svc.config import NotifySettings
from notify_svc.server import build_runner as build_notify
from notify_svc.smtp import SmtpSettings
from notify_svc.webhooks import WebhookSettings
from opsmesh.notify.v1 import notify_pb2 as notify_pb
from opsmesh.notify.v1 import notify_pb2_grpc
from opsmesh.task.v1 import task_pb2 as pb
from task_svc.states import TERMINAL
from tests.conftest import FAST_HEALTH
from tests.helpers import assert_eventually, identity
from tests.smtp_sink import Sink
from tests.taskkit import (
    Script,
    ScriptedHandler,
    TaskStack,
    running_worker,
    task_stack,
    task_store,
)
from tests.test_task_service import publish_email, queue_depth, wait_status

ALICE = identity("alice", "acme")
ROOT = Path(__file__).resolve().parent.parent


def worker_process(
    stack: TaskStack, redis_url: str, tmp_path: Path, name: str, *, seconds: float
) -> ManagedProcess:
    env = dict(
        os.environ,
        OPSMESH_NATS_URL=stack.nats_url,
        OPSMESH_TASK_NAMESPACE=stack.topology.namespace,
        OPSMESH_WORKER_ID=name,
        OPSMESH_WORKER_ACK_WAIT="2s",
        OPSMESH_TASK_LEASE_TTL="2s",
        OPSMESH_WORKER_CONCURRENCY="2",
        OPSMESH_GRPC_PORT=str(free_port()),
        OPSMESH_METRICS_PORT="0",
        OPSMESH_TASK_BACKOFF_BASE="50ms",
        EFFECTS_REDIS_URL=redis_url,
        HANDLER_SECONDS=str(seconds),
    )
    return ManagedProcess(
        name,
        [sys.executable, "-m", "tests.task_worker_process"],
        log_path=tmp_path / f"{name}.log",
        ready=re.compile(r"worker \S+ consuming email"),
        env=env,
    )


async def test_worker_killed_mid_task_is_redelivered_and_the_effect_happens_once(
    nats_server: NatsServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    effects = aioredis.Redis.from_url(redis_server.url)
    async with task_stack(nats_server.url) as stack:
        task = await publish_email(stack)
        doomed = worker_process(stack, redis_server.url, tmp_path, "doomed", seconds=30)
        doomed.start()
        try:

            async def started() -> None:
                assert await effects.get(f"calls:{task.id}") == b"1"

            await assert_eventually(started, timeout=15)
            running = (
                await stack.stub.GetTask(pb.GetTaskRequest(task_id=task.id), metadata=ALICE)
            ).task
            assert running.status == pb.TASK_STATUS_RUNNING
        finally:
            assert doomed.process is not None
            doomed.process.send_signal(signal.SIGKILL)
            doomed.process.wait()
        survivor = worker_process(stack, redis_server.url, tmp_path, "survivor", seconds=0)
        survivor.start()
        try:
            done = await wait_status(stack, task.id, pb.TASK_STATUS_SUCCEEDED, within=30)
        finally:
            survivor.stop()
    assert await effects.get(f"effect:{task.id}") == b"survivor"
    assert int(await effects.get(f"calls:{task.id}") or 0) == 2
    assert [a.worker for a in done.attempts] == ["doomed", "survivor"]
    assert done.attempts[0].error == "worker stopped responding"
    assert done.retry_count == 1
    await effects.aclose()


async def test_worker_process_drains_on_sigterm(
    nats_server: NatsServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    async with task_stack(nats_server.url) as stack:
        worker = worker_process(stack, redis_server.url, tmp_path, "graceful", seconds=0)
        worker.start()
        task = await publish_email(stack)
        await wait_status(stack, task.id, pb.TASK_STATUS_SUCCEEDED)
        assert worker.process is not None
        worker.process.send_signal(signal.SIGTERM)
        assert worker.process.wait(15) == 0
    messages = [json.loads(line)["message"] for line in worker.log_path.read_text().splitlines()]
    assert messages[-1] == "stopped"


async def test_nats_restart_mid_run_loses_no_task(tmp_path: Path) -> None:
    nats = NatsServer(tmp_path / "nats").start()
    try:
        async with task_stack(nats.url) as stack:
            handler = ScriptedHandler()
            handler.scripts.update({})
            tasks = [await publish_email(stack) for _ in range(20)]
            for task in tasks:
                handler.scripts[task.payload["notification_id"]] = Script(
                    step_seconds=0.05, steps=1
                )
            async with running_worker(stack, handler, concurrency=2):

                async def some_done() -> None:
                    assert len(handler.effects) >= 3

                await assert_eventually(some_done, timeout=15)
                nats.stop()
                await asyncio.sleep(0.5)
                nats.start()  # same port, same JetStream store on disk
                for task in tasks:
                    await wait_status(stack, task.id, pb.TASK_STATUS_SUCCEEDED, within=60)
            assert set(handler.effects) == {t.id for t in tasks}
    finally:
        nats.stop()


async def test_publish_while_nats_is_down_is_unavailable_and_leaves_nothing(tmp_path: Path) -> None:
    nats = NatsServer(tmp_path / "nats").start()
    try:
        async with task_stack(nats.url) as stack:
            nats.stop()
            with pytest.raises(aio.AioRpcError) as caught:
                await publish_email(stack, key="while-down")
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "nats is unavailable" in (caught.value.details() or "")
            nats.start()

            async def listed_empty() -> None:
                try:
                    page = await stack.stub.ListTasks(pb.ListTasksRequest(), metadata=ALICE)
                except aio.AioRpcError as error:  # still reconnecting
                    assert error.code() != grpc.StatusCode.UNAVAILABLE
                    raise
                assert page.tasks == []

            await assert_eventually(listed_empty, timeout=20)
            task = await publish_email(stack, key="while-down")
            assert task.status == pb.TASK_STATUS_PENDING
    finally:
        nats.stop()


def test_task_processes_reject_bad_configuration() -> None:
    env = dict(
        os.environ,
        OPSMESH_NATS_URL="http://nope",
        OPSMESH_WORKER_CONCURRENCY="0",
        OPSMESH_TASK_NAMESPACE="bad.name",
    )
    for module in ("task_svc", "task_svc.worker"):
        result = subprocess.run(
            [sys.executable, "-m", module],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            cwd=ROOT,
        )
        assert result.returncode == 2, result.stderr
        assert "OPSMESH_NATS_URL" in result.stderr
        assert "OPSMESH_TASK_NAMESPACE" in result.stderr
        assert "Traceback" not in result.stderr


# --- Crash patterns with real processes: email tasks through notify_svc to an SMTP sink ----

EMAILS = 300
SERVICE = identity("mailer", "acme", "service")
# Short enough that CI recovers in seconds; the production defaults are in docs/tasks.md.
FAST_RECOVERY = {
    "OPSMESH_WORKER_ACK_WAIT": "1s",
    "OPSMESH_TASK_LEASE_TTL": "1s",
    "OPSMESH_TASK_REAP_INTERVAL": "300ms",
    "OPSMESH_TASK_OUTBOX_GRACE": "1s",
    "OPSMESH_TASK_BACKOFF_BASE": "50ms",
    "OPSMESH_TASK_BACKOFF_CAP": "500ms",
    "OPSMESH_TASK_MAX_ATTEMPTS_EMAIL": "30",
    "OPSMESH_WORKER_CONCURRENCY": "8",
    "OPSMESH_NATS_TIMEOUT": "1s",
}
RECOVERY_BOUND = 30.0
"""Seconds after the last crash by which every task must be final and the queue empty."""


@dataclass
class EmailRun:
    """A notify_svc + task_svc stack in this process, email workers as processes."""

    nats: NatsServer
    tasks: TaskStack
    notify: notify_pb2_grpc.NotificationServiceStub
    notify_port: int
    sink: Sink
    tmp_path: Path
    workers: list[ManagedProcess] = field(default_factory=list)

    def start_worker(self) -> ManagedProcess:
        name = f"mailer{len(self.workers)}"
        env = dict(
            os.environ,
            **FAST_RECOVERY,
            OPSMESH_NATS_URL=self.nats.url,
            OPSMESH_TASK_NAMESPACE=self.tasks.topology.namespace,
            OPSMESH_WORKER_ID=name,
            OPSMESH_NOTIFY_ADDR=f"127.0.0.1:{self.notify_port}",
            OPSMESH_GRPC_PORT=str(free_port()),
            OPSMESH_METRICS_PORT="0",
        )
        worker = ManagedProcess(
            name,
            [sys.executable, "-m", "task_svc.worker"],
            log_path=self.tmp_path / f"{name}.log",
            ready=re.compile(r"worker \S+ consuming"),
            env=env,
        )
        worker.start()
        self.workers.append(worker)
        return worker

    async def send(self, count: int) -> dict[str, str]:
        """Queues ``count`` emails; their task ids by notification id."""

        async def one(number: int) -> tuple[str, str]:
            reply = await self.notify.SendEmail(
                notify_pb.SendEmailRequest(
                    template="password_reset",
                    data=struct(
                        reset_url=f"https://opsmesh.example/r/{number}", expires_in_minutes=30
                    ),
                    to=[notify_pb.Recipient(address=f"user{number}@example.com")],
                ),
                metadata=SERVICE,
            )
            return reply.notification.id, reply.notification.task_id

        return dict(await asyncio.gather(*(one(n) for n in range(count))))

    def delivered(self) -> Counter[str]:
        return Counter(str(message["Message-ID"]) for message, _ in self.sink.messages)


def struct(**values: object) -> struct_pb2.Struct:
    result = struct_pb2.Struct()
    result.update(values)
    return result


@asynccontextmanager
async def email_run(tmp_path: Path, redis_url: str) -> AsyncIterator[EmailRun]:
    nats = NatsServer(tmp_path / "nats").start()
    sink = Sink().start()
    try:
        async with task_stack(nats.url, max_attempts=30) as tasks:
            settings = NotifySettings(
                server=ServerSettings(port=0, grace_period=1.0),
                redis=RedisSettings(url=redis_url),
                smtp=SmtpSettings(port=sink.port, timeout=2.0, sender="opsmesh <no@opsmesh.test>"),
                task_address=f"127.0.0.1:{tasks.runner.port}",
                key_prefix=f"faults:{uuid.uuid4().hex[:8]}:",
                claim_lease=5.0,  # a killed worker does not kill notify_svc: its sends finish
                webhooks=WebhookSettings(port=0),
            )
            runner, _ = build_notify(settings, options=FAST_HEALTH)
            await runner.start()
            try:
                async with aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel:
                    run = EmailRun(
                        nats,
                        tasks,
                        notify_pb2_grpc.NotificationServiceStub(channel),
                        runner.port,
                        sink,
                        tmp_path,
                    )
                    try:
                        yield run
                    finally:
                        for worker in run.workers:
                            worker.kill()
            finally:
                await runner.stop()
    finally:
        sink.stop()
        nats.stop()


def sigkill(process: ManagedProcess | NatsServer) -> None:
    process.kill()


async def settled(run: EmailRun, task_ids: Collection[str], started: float) -> dict[str, object]:
    """Waits until every task is final, every email sent and the queue empty; the figures."""
    async with task_store(run.tasks) as store:
        client = await nats.connect(run.nats.url)
        js = client.jetstream(timeout=2.0)
        try:

            async def finished() -> None:
                records = [await store.get("acme", task_id) for task_id in task_ids]
                unfinished = Counter(
                    (pb.TaskStatus.Name(t.status), t.error, len(t.attempts))
                    for t in records
                    if t.status not in TERMINAL
                )
                assert not unfinished, f"tasks not final: {unfinished}"
                assert await queue_depth(run.tasks, js) == 0

            await assert_eventually(finished, timeout=RECOVERY_BOUND, interval=0.25)
            recovery = time.monotonic() - started
            records = [await store.get("acme", task_id) for task_id in task_ids]
            failed = Counter(t.error for t in records if t.status != pb.TASK_STATUS_SUCCEEDED)
        finally:
            await client.close()
    await asyncio.sleep(0.5)  # a late duplicate would arrive by now
    return {"recovery_s": round(recovery, 2), "failed": failed.total(), "errors": dict(failed)}


def tally(run: EmailRun, notifications: Collection[str]) -> dict[str, int]:
    delivered = run.delivered()
    expected = {f"<{nid}@opsmesh>" for nid in notifications}
    return {
        "sent": len(expected),
        "delivered_once": sum(delivered[m] == 1 for m in expected),
        "missing": sum(delivered[m] == 0 for m in expected),
        "duplicated": sum(delivered[m] > 1 for m in expected),
        "strangers": sum(1 for m in delivered if m not in expected),
    }


def report(pattern: str, figures: dict[str, object], counts: dict[str, int]) -> None:
    print(f"\nfault pattern {pattern}: {json.dumps({**counts, **figures})}")
    assert counts["delivered_once"] == counts["sent"], counts
    assert figures["failed"] == 0, figures


async def wait_delivered(run: EmailRun, at_least: int) -> None:
    async def enough() -> None:
        assert len(run.sink.messages) >= at_least

    await assert_eventually(enough, timeout=30)


async def test_worker_killed_repeatedly_while_draining(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with email_run(tmp_path, redis_server.url) as run:
        sent = await run.send(EMAILS)
        worker = run.start_worker()
        for round_ in range(1, 5):
            await wait_delivered(run, round_ * EMAILS // 6)
            sigkill(worker)
            worker = run.start_worker()
        last_crash = time.monotonic()
        figures = await settled(run, sent.values(), last_crash)
        report("worker killed x4", figures, tally(run, sent))


async def test_nats_killed_while_the_worker_drains(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with email_run(tmp_path, redis_server.url) as run:
        sent = await run.send(EMAILS)
        run.start_worker()
        for round_ in range(1, 3):
            await wait_delivered(run, round_ * EMAILS // 4)
            sigkill(run.nats)
            run.nats.start()  # same port, same JetStream store on disk
        last_crash = time.monotonic()
        figures = await settled(run, sent.values(), last_crash)
        report("nats killed x2", figures, tally(run, sent))


async def test_worker_and_nats_killed_together(redis_server: RedisServer, tmp_path: Path) -> None:
    async with email_run(tmp_path, redis_server.url) as run:
        sent = await run.send(EMAILS)
        worker = run.start_worker()
        for round_ in range(1, 3):
            await wait_delivered(run, round_ * EMAILS // 4)
            sigkill(worker)
            sigkill(run.nats)
            run.nats.start()
            worker = run.start_worker()
        last_crash = time.monotonic()
        figures = await settled(run, sent.values(), last_crash)
        report("worker+nats killed x2", figures, tally(run, sent))
