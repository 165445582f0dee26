"""The task system under faults: killed workers, NATS restarts, NATS down."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis
from grpc import aio

from devtools.servers import ManagedProcess, NatsServer, RedisServer, free_port
from opsmesh.task.v1 import task_pb2 as pb
from tests.helpers import assert_eventually, identity
from tests.taskkit import Script, ScriptedHandler, TaskStack, running_worker, task_stack
from tests.test_task_service import publish_email, wait_status

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
