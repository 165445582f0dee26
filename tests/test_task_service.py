"""TaskService and the worker against a real nats-server with JetStream."""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import nats
import pytest
from grpc import aio
from nats.js import JetStreamContext

from devtools.servers import NatsServer
from opsmesh.task.v1 import task_pb2 as pb
from task_svc import lease, outbox
from task_svc.handlers import workspace_without_cluster
from task_svc.outbox import OpenTasks, marker_key
from task_svc.queue import Publisher
from task_svc.service import with_typed_payload
from task_svc.store import TaskStore, new_task_id
from tests.helpers import assert_eventually, error_details, identity
from tests.taskkit import (
    EMAIL,
    Script,
    ScriptedHandler,
    TaskStack,
    abandon,
    running_worker,
    task_stack,
    task_store,
)

ALICE = identity("alice", "acme")
EVE = identity("eve", "evilcorp")


@pytest.fixture
async def stack(nats_server: NatsServer):
    async with task_stack(nats_server.url) as tasks:
        yield tasks


async def publish_email(
    stack: TaskStack, notification_id: str | None = None, key: str = "", who=ALICE
) -> pb.Task:
    response = await stack.stub.PublishEmailTask(
        pb.PublishEmailTaskRequest(
            payload=pb.EmailTaskPayload(notification_id=notification_id or str(uuid.uuid4())),
            idempotency_key=key,
        ),
        metadata=who,
    )
    return response.task


async def wait_status(
    stack: TaskStack, task_id: str, status: int, who=ALICE, within: float = 15.0
) -> pb.Task:
    async def reached() -> pb.Task:
        try:
            task = (await stack.stub.GetTask(pb.GetTaskRequest(task_id=task_id), metadata=who)).task
        except aio.AioRpcError as error:  # NATS restarting in the fault tests: poll on
            assert error.code() != grpc.StatusCode.UNAVAILABLE, error.details()
            raise
        assert task.status == status, (pb.TaskStatus.Name(task.status), task.error)
        return task

    return await assert_eventually(reached, timeout=within)


async def test_published_task_runs_once_and_succeeds(stack) -> None:
    handler = ScriptedHandler()
    task = await publish_email(stack)
    assert task.status == pb.TASK_STATUS_PENDING
    assert (task.org_id, task.created_by, task.type) == ("acme", "alice", pb.TASK_TYPE_EMAIL)
    assert task.payload["notification_id"]
    assert task.created_at.seconds > 0
    assert task.max_attempts == 3
    async with running_worker(stack, handler):
        done = await wait_status(stack, task.id, pb.TASK_STATUS_SUCCEEDED)
    assert handler.effects[task.id] == 1
    assert sum(handler.calls.values()) == 1
    assert [a.number for a in done.attempts] == [1]
    assert done.attempts[0].worker == "w1"
    assert done.attempts[0].HasField("ended_at")
    assert done.retry_count == 0
    assert done.error == ""


async def test_same_idempotency_key_returns_the_same_task(stack) -> None:
    handler = ScriptedHandler()
    first = await publish_email(stack, key="invite-42")
    again = await publish_email(stack, key="invite-42")
    other_org = await publish_email(stack, key="invite-42", who=EVE)
    assert again.id == first.id
    assert other_org.id != first.id
    racing = await asyncio.gather(*(publish_email(stack, key="race") for _ in range(10)))
    assert len({t.id for t in racing}) == 1
    async with running_worker(stack, handler):
        await wait_status(stack, first.id, pb.TASK_STATUS_SUCCEEDED)
        await wait_status(stack, racing[0].id, pb.TASK_STATUS_SUCCEEDED)
    assert sum(handler.calls.values()) == 3  # acme once, evilcorp once, the race once


async def test_transient_failures_are_retried_then_succeed(stack) -> None:
    nid = str(uuid.uuid4())
    handler = ScriptedHandler(scripts={nid: Script(transient_failures=2)})
    task = await publish_email(stack, nid)
    async with running_worker(stack, handler):
        done = await wait_status(stack, task.id, pb.TASK_STATUS_SUCCEEDED)
    assert done.retry_count == 2
    assert [a.number for a in done.attempts] == [1, 2, 3]
    assert "smtp down" in done.attempts[0].error
    assert handler.effects[task.id] == 1


async def test_exhausted_retries_fail_as_dead_letter_and_retry_task_resubmits(stack) -> None:
    nid = str(uuid.uuid4())
    script = Script(always_fail=True)
    handler = ScriptedHandler(scripts={nid: script})
    task = await publish_email(stack, nid)
    async with running_worker(stack, handler):
        failed = await wait_status(stack, task.id, pb.TASK_STATUS_FAILED)
        assert "gave up after 3 attempts" in failed.error
        assert len(failed.attempts) == 3
        assert handler.calls[nid] == 3
        listed = await stack.stub.ListTasks(
            pb.ListTasksRequest(statuses=[pb.TASK_STATUS_FAILED]), metadata=ALICE
        )
        assert [t.id for t in listed.tasks] == [task.id]

        script.always_fail = False
        resubmitted = (
            await stack.stub.RetryTask(pb.RetryTaskRequest(task_id=task.id), metadata=ALICE)
        ).task
        assert resubmitted.status == pb.TASK_STATUS_PENDING
        assert resubmitted.retry_count == 0
        done = await wait_status(stack, task.id, pb.TASK_STATUS_SUCCEEDED)
    assert len(done.attempts) == 4
    with pytest.raises(aio.AioRpcError) as caught:
        await stack.stub.RetryTask(pb.RetryTaskRequest(task_id=task.id), metadata=ALICE)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_permanent_failure_fails_at_once(stack) -> None:
    nid = str(uuid.uuid4())
    handler = ScriptedHandler(scripts={nid: Script(permanent=True)})
    task = await publish_email(stack, nid)
    async with running_worker(stack, handler):
        failed = await wait_status(stack, task.id, pb.TASK_STATUS_FAILED)
    assert failed.error == "the recipient does not exist"
    assert handler.calls[nid] == 1


async def test_cancel_pending_task_never_runs(stack) -> None:
    handler = ScriptedHandler()
    task = await publish_email(stack)
    cancelled = (
        await stack.stub.CancelTask(
            pb.CancelTaskRequest(task_id=task.id, reason="typo"), metadata=ALICE
        )
    ).task
    assert cancelled.status == pb.TASK_STATUS_CANCELLED
    assert cancelled.error == "typo"
    canary = await publish_email(stack)
    async with running_worker(stack, handler):
        await wait_status(stack, canary.id, pb.TASK_STATUS_SUCCEEDED)
    assert task.payload["notification_id"] not in handler.calls
    with pytest.raises(aio.AioRpcError) as caught:
        await stack.stub.CancelTask(pb.CancelTaskRequest(task_id=task.id), metadata=ALICE)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_details(caught.value)["ErrorInfo"].reason == "TASK_FINISHED"


async def test_cancel_running_task_is_honoured_by_the_handler(stack) -> None:
    nid = str(uuid.uuid4())
    handler = ScriptedHandler(scripts={nid: Script(steps=200, step_seconds=0.05)})
    task = await publish_email(stack, nid)
    async with running_worker(stack, handler):
        await asyncio.wait_for(handler.started_event(nid).wait(), 10)
        requested = (
            await stack.stub.CancelTask(pb.CancelTaskRequest(task_id=task.id), metadata=ALICE)
        ).task
        assert requested.status == pb.TASK_STATUS_RUNNING
        assert requested.cancel_requested
        done = await wait_status(stack, task.id, pb.TASK_STATUS_CANCELLED)
    assert done.progress.steps_done < 199
    assert task.id not in handler.effects


async def test_watch_streams_every_transition_until_terminal(stack) -> None:
    nid = str(uuid.uuid4())
    handler = ScriptedHandler(scripts={nid: Script(transient_failures=1, steps=2)})
    task = await publish_email(stack, nid)
    seen: list[tuple[int, int]] = []
    watching = asyncio.Event()

    async def watch() -> None:
        async for update in stack.stub.WatchTask(
            pb.WatchTaskRequest(task_id=task.id), metadata=ALICE
        ):
            seen.append((update.task.status, update.task.version))
            watching.set()

    watcher = asyncio.ensure_future(watch())
    # The watch's first answer is the current state, sent once it follows the record: from then
    # on it misses no transition, so the worker may start.
    await asyncio.wait_for(watching.wait(), 10)
    async with running_worker(stack, handler):
        await asyncio.wait_for(watcher, 15)
    statuses = [status for status, _ in seen]
    assert statuses[0] == pb.TASK_STATUS_PENDING
    assert statuses[-1] == pb.TASK_STATUS_SUCCEEDED
    assert pb.TASK_STATUS_RETRYING in statuses
    assert statuses.count(pb.TASK_STATUS_RUNNING) >= 2
    versions = [version for _, version in seen]
    assert versions == sorted(set(versions)), "each version once, in order"


async def test_another_org_cannot_see_or_change_a_task(stack) -> None:
    task = await publish_email(stack)
    calls = [
        stack.stub.GetTask(pb.GetTaskRequest(task_id=task.id), metadata=EVE),
        stack.stub.CancelTask(pb.CancelTaskRequest(task_id=task.id), metadata=EVE),
        stack.stub.RetryTask(pb.RetryTaskRequest(task_id=task.id), metadata=EVE),
    ]
    for call in calls:
        with pytest.raises(aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(aio.AioRpcError) as caught:
        async for _ in stack.stub.WatchTask(pb.WatchTaskRequest(task_id=task.id), metadata=EVE):
            pass
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert (await stack.stub.ListTasks(pb.ListTasksRequest(), metadata=EVE)).tasks == []
    still = (await stack.stub.GetTask(pb.GetTaskRequest(task_id=task.id), metadata=ALICE)).task
    assert still.status == pb.TASK_STATUS_PENDING


@pytest.mark.parametrize("org", [">", "*", "acme.*", "acme.>"], ids=repr)
async def test_an_org_named_like_a_subject_wildcard_lists_no_other_orgs_tasks(
    stack, org: str
) -> None:
    # ListTasks filters the bucket's subjects by the org: a wildcard in it must stay a name.
    # The service refuses such an org id at the door, and the store keeps it a name anyway.
    task = await publish_email(stack)
    with pytest.raises(aio.AioRpcError) as refused:
        await stack.stub.ListTasks(pb.ListTasksRequest(), metadata=identity("mallory", org))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    async with task_store(stack) as store:
        assert await store.page(org, before=None, limit=50) == ([], None)
        listed, _ = await store.page("acme", before=None, limit=200)
        assert task.id in {t.id for t in listed}


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (pb.WorkspaceTaskPayload(workspace="team-a"), "payload.action"),
        (
            pb.WorkspaceTaskPayload(action=pb.WORKSPACE_ACTION_PROVISION, workspace="Team_A"),
            "payload.workspace",
        ),
        (
            pb.WorkspaceTaskPayload(action=pb.WORKSPACE_ACTION_PROVISION, workspace="a" * 41),
            "payload.workspace",
        ),
        (
            pb.WorkspaceTaskPayload(
                action=pb.WORKSPACE_ACTION_PROVISION,
                workspace="team-a",
                quota=pb.WorkspaceQuota(memory="lots"),
            ),
            "payload.quota.memory",
        ),
        (
            pb.WorkspaceTaskPayload(
                action=pb.WORKSPACE_ACTION_PROVISION,
                workspace="team-a",
                quota=pb.WorkspaceQuota(pods=-1),
            ),
            "payload.quota.pods",
        ),
        (
            pb.WorkspaceTaskPayload(
                action=pb.WORKSPACE_ACTION_PROVISION,
                workspace="team-a",
                notify_emails=["not-an-address\r\nBcc: x@y.z"],
            ),
            "payload.notify_emails",
        ),
    ],
)
async def test_bad_workspace_payloads_are_rejected_before_anything_is_queued(
    stack, payload, field
) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await stack.stub.PublishWorkspaceTask(
            pb.PublishWorkspaceTaskRequest(payload=payload), metadata=ALICE
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(caught.value)["BadRequest"].field_violations[0].field == field
    assert (await stack.stub.ListTasks(pb.ListTasksRequest(), metadata=ALICE)).tasks == []


async def test_other_bad_requests_are_invalid_argument(stack) -> None:
    bad = [
        stack.stub.PublishEmailTask(
            pb.PublishEmailTaskRequest(payload=pb.EmailTaskPayload(notification_id="x")),
            metadata=ALICE,
        ),
        stack.stub.PublishEmailTask(
            pb.PublishEmailTaskRequest(
                payload=pb.EmailTaskPayload(notification_id=str(uuid.uuid4())),
                idempotency_key="k" * 129,
            ),
            metadata=ALICE,
        ),
        stack.stub.GetTask(pb.GetTaskRequest(task_id="nope"), metadata=ALICE),
        stack.stub.ListTasks(pb.ListTasksRequest(page_token="garbage"), metadata=ALICE),
        stack.stub.ListTasks(pb.ListTasksRequest(page_size=-5), metadata=ALICE),
    ]
    for call in bad:
        with pytest.raises(aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(aio.AioRpcError) as caught:
        await stack.stub.GetTask(pb.GetTaskRequest(task_id=str(uuid.uuid4())), metadata=ALICE)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(aio.AioRpcError) as caught:
        await stack.stub.ListTasks(pb.ListTasksRequest())
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_listing_pages_newest_first_with_filters(stack) -> None:
    who = identity("lister", "listorg")
    ids = [(await publish_email(stack, who=who)).id for _ in range(5)]
    workspace = (
        await stack.stub.PublishWorkspaceTask(
            pb.PublishWorkspaceTaskRequest(
                payload=pb.WorkspaceTaskPayload(
                    action=pb.WORKSPACE_ACTION_PROVISION, workspace="team-a"
                )
            ),
            metadata=who,
        )
    ).task
    seen, token = [], ""
    while True:
        page = await stack.stub.ListTasks(
            pb.ListTasksRequest(page_size=2, page_token=token), metadata=who
        )
        seen += [t.id for t in page.tasks]
        token = page.next_page_token
        if not token:
            break
    assert seen == [workspace.id, *reversed(ids)]
    emails = await stack.stub.ListTasks(
        pb.ListTasksRequest(types=[pb.TASK_TYPE_EMAIL]), metadata=who
    )
    assert [t.id for t in emails.tasks] == list(reversed(ids))
    assert workspace.payload["workspace"] == "team-a"
    assert workspace.payload["action"] == "WORKSPACE_ACTION_PROVISION"


async def test_workspace_task_without_a_cluster_fails_with_a_clear_error(stack) -> None:
    task = (
        await stack.stub.PublishWorkspaceTask(
            pb.PublishWorkspaceTaskRequest(
                payload=pb.WorkspaceTaskPayload(
                    action=pb.WORKSPACE_ACTION_PROVISION, workspace="team-b"
                )
            ),
            metadata=ALICE,
        )
    ).task
    async with running_worker(stack, workspace_without_cluster, types=(pb.TASK_TYPE_WORKSPACE,)):
        failed = await wait_status(stack, task.id, pb.TASK_STATUS_FAILED)
    assert "no Kubernetes cluster is configured" in failed.error
    assert len(failed.attempts) == 1


async def test_two_workers_share_the_queue_and_run_each_task_once(stack) -> None:
    handler = ScriptedHandler()
    tasks = await asyncio.gather(*(publish_email(stack) for _ in range(40)))
    async with (
        running_worker(stack, handler, worker_id="w1"),
        running_worker(stack, handler, worker_id="w2"),
    ):
        for task in tasks:
            await wait_status(stack, task.id, pb.TASK_STATUS_SUCCEEDED)
    assert sum(handler.calls.values()) == 40
    assert set(handler.calls.values()) == {1}
    workers = set()
    for task in tasks:
        done = (await stack.stub.GetTask(pb.GetTaskRequest(task_id=task.id), metadata=ALICE)).task
        workers.add(done.attempts[0].worker)
    assert workers == {"w1", "w2"}


async def test_stopping_a_worker_hands_back_unfinished_tasks(stack) -> None:
    nid = str(uuid.uuid4())
    release = asyncio.Event()
    handler = ScriptedHandler(scripts={nid: Script(release=release)})
    task = await publish_email(stack, nid)
    async with running_worker(stack, handler, worker_id="leaving", grace=0.2):
        await asyncio.wait_for(handler.started_event(nid).wait(), 10)
    handed_back = await wait_status(stack, task.id, pb.TASK_STATUS_RETRYING)
    assert handed_back.error == "worker stopped before finishing"
    release.set()
    async with running_worker(stack, handler, worker_id="next"):
        done = await wait_status(stack, task.id, pb.TASK_STATUS_SUCCEEDED)
    assert [a.worker for a in done.attempts] == ["leaving", "next"]
    assert handler.effects[task.id] == 1


async def test_records_expire_after_the_retention_period(stack) -> None:
    client = await nats.connect(stack.nats_url)
    try:
        bucket = await client.jetstream().key_value(stack.topology.bucket)
        status = await bucket.status()
        assert status.ttl == stack.topology.retention == 30 * 86400
        assert status.history == 1
    finally:
        await client.close()


async def first_watched(stack: TaskStack, task_id: str, who=ALICE) -> pb.Task:
    """The first WatchTaskResponse (the task as it is now), then the stream is cancelled."""
    call = stack.stub.WatchTask(pb.WatchTaskRequest(task_id=task_id), metadata=who)
    try:
        async for update in call:
            return update.task
    finally:
        call.cancel()
    raise AssertionError("WatchTask ended without a task")


async def test_workspace_task_comes_back_with_its_typed_payload(stack) -> None:
    who = identity("typist", "typedorg")
    payload = pb.WorkspaceTaskPayload(
        action=pb.WORKSPACE_ACTION_PROVISION,
        workspace="typed-ws",
        quota=pb.WorkspaceQuota(cpu="4", memory="8Gi", pods=3),
        notify_emails=["ops@example.com"],
    )
    published = (
        await stack.stub.PublishWorkspaceTask(
            pb.PublishWorkspaceTaskRequest(payload=payload, idempotency_key="typed-ws"),
            metadata=who,
        )
    ).task
    again = (
        await stack.stub.PublishWorkspaceTask(
            pb.PublishWorkspaceTaskRequest(payload=payload, idempotency_key="typed-ws"),
            metadata=who,
        )
    ).task
    got = (await stack.stub.GetTask(pb.GetTaskRequest(task_id=published.id), metadata=who)).task
    (listed,) = (await stack.stub.ListTasks(pb.ListTasksRequest(), metadata=who)).tasks
    watched = await first_watched(stack, published.id, who)
    cancelled = (
        await stack.stub.CancelTask(pb.CancelTaskRequest(task_id=published.id), metadata=who)
    ).task
    retried = (
        await stack.stub.RetryTask(pb.RetryTaskRequest(task_id=published.id), metadata=who)
    ).task
    for name, task in {
        "PublishWorkspaceTask": published,
        "PublishWorkspaceTask again": again,
        "GetTask": got,
        "ListTasks": listed,
        "WatchTask": watched,
        "CancelTask": cancelled,
        "RetryTask": retried,
    }.items():
        assert task.id == published.id, name
        assert task.WhichOneof("typed_payload") == "workspace", name
        assert task.workspace == payload, name
        assert task.workspace.quota.pods == 3, name
        assert type(task.workspace.quota.pods) is int, name
    # The deprecated Struct stays as it was, doubles included, for older clients.
    assert published.payload["quota"]["pods"] == 3.0
    assert type(published.payload["quota"]["pods"]) is float
    assert published.payload["workspace"] == "typed-ws"


async def test_email_task_comes_back_with_its_typed_payload_while_it_runs(stack) -> None:
    nid = str(uuid.uuid4())
    handler = ScriptedHandler(scripts={nid: Script(transient_failures=1, steps=2)})
    published = await publish_email(stack, nid)
    assert published.WhichOneof("typed_payload") == "email"
    assert published.email.notification_id == nid
    seen: list[pb.Task] = []
    watching = asyncio.Event()

    async def watch() -> None:
        async for update in stack.stub.WatchTask(
            pb.WatchTaskRequest(task_id=published.id), metadata=ALICE
        ):
            seen.append(update.task)
            watching.set()

    watcher = asyncio.ensure_future(watch())
    await asyncio.wait_for(watching.wait(), 10)  # the current state first: the watch follows
    async with running_worker(stack, handler):
        await asyncio.wait_for(watcher, 15)
    assert [t.status for t in seen][-1] == pb.TASK_STATUS_SUCCEEDED
    assert {pb.TASK_STATUS_PENDING, pb.TASK_STATUS_RUNNING} <= {t.status for t in seen}
    for task in seen:
        assert task.WhichOneof("typed_payload") == "email", pb.TaskStatus.Name(task.status)
        assert task.email.notification_id == nid
    emails = await stack.stub.ListTasks(
        pb.ListTasksRequest(types=[pb.TASK_TYPE_EMAIL]), metadata=ALICE
    )
    (listed,) = [t for t in emails.tasks if t.id == published.id]
    assert listed.email == pb.EmailTaskPayload(notification_id=nid)
    assert not listed.HasField("workspace")


def test_typed_payload_ignores_unknown_fields_and_survives_a_bad_record() -> None:
    newer = pb.Task(id="t1", type=pb.TASK_TYPE_WORKSPACE)
    newer.payload.update({"workspace": "w", "quota": {"pods": 7}, "added_later": True})
    assert with_typed_payload(newer).workspace == pb.WorkspaceTaskPayload(
        workspace="w", quota=pb.WorkspaceQuota(pods=7)
    )
    empty = pb.Task(id="t2", type=pb.TASK_TYPE_EMAIL)
    assert with_typed_payload(empty).WhichOneof("typed_payload") == "email"
    broken = pb.Task(id="t3", type=pb.TASK_TYPE_WORKSPACE)
    broken.payload.update({"workspace": "w", "quota": {"pods": "many"}})
    assert with_typed_payload(broken).WhichOneof("typed_payload") is None
    untyped = pb.Task(id="t4")
    untyped.payload.update({"x": 1})
    assert with_typed_payload(untyped).WhichOneof("typed_payload") is None


async def test_a_redelivery_takes_over_the_attempt_of_a_dead_worker(stack) -> None:
    # After a NATS crash the message comes back with num_delivered == 1 while the record
    # still shows the dead worker's attempt: the lapsed lease, not the count, decides.
    handler = ScriptedHandler()
    task = await publish_email(stack)
    async with task_store(stack) as store:
        await store.change(task.org_id, task.id, abandon)
    async with running_worker(stack, handler, worker_id="heir"):
        done = await wait_status(stack, task.id, pb.TASK_STATUS_SUCCEEDED)
    assert [(a.worker, a.error) for a in done.attempts] == [
        ("dead", "worker stopped responding"),
        ("heir", ""),
    ]
    assert done.retry_count == 1
    assert handler.effects[task.id] == 1


async def test_a_live_lease_is_left_alone_and_its_duplicate_message_waits(stack) -> None:
    nid = str(uuid.uuid4())
    release = asyncio.Event()
    handler = ScriptedHandler(scripts={nid: Script(release=release)})
    task = await publish_email(stack, nid)
    async with running_worker(stack, handler, lease_ttl=0.6, concurrency=4) as worker:
        await asyncio.wait_for(handler.started_event(nid).wait(), 10)
        async with task_store(stack) as store:
            record, revision = await store.read(task.org_id, task.id)
            copy = pb.Task()
            copy.CopyFrom(record)
            copy.version += 1000  # another message id: not dropped as a duplicate
            await Publisher(worker.js, stack.topology, timeout=2.0).publish(copy, revision)
        await asyncio.sleep(1.5)  # the duplicate was fetched, found the lease live, went back
        assert handler.calls[nid] == 1
        release.set()
        done = await wait_status(stack, task.id, pb.TASK_STATUS_SUCCEEDED)

        async def drained() -> None:
            assert await queue_depth(stack, worker.js) == 0

        await assert_eventually(drained, timeout=10)
    assert handler.calls[nid] == 1
    assert len(done.attempts) == 1


async def test_the_reaper_takes_over_a_stale_attempt_whose_message_is_gone(stack) -> None:
    handler = ScriptedHandler()
    async with task_store(stack) as store:
        task = await stage_task(store)
        await store.change(task.org_id, task.id, abandon)
        await OpenTasks(store).queued(task)  # its message was queued and is gone
    async with running_worker(stack, handler, reap_interval=0.2):
        done = await wait_status(stack, task.id, pb.TASK_STATUS_SUCCEEDED, within=10)
    assert [a.worker for a in done.attempts] == ["dead", "w1"]
    assert handler.effects[task.id] == 1


async def test_a_message_lost_after_it_was_stored_is_sent_again_under_an_id_of_its_own(
    stack,
) -> None:
    # An unclean NATS restart can lose a stored message while its id stays in JetStream's
    # duplicate window (two minutes): a re-send under the same id would be dropped, and the
    # task would wait that long (the SIGKILL-together fault test caught one).
    handler = ScriptedHandler()
    task = await publish_email(stack)
    client = await nats.connect(stack.nats_url)
    try:
        await client.jetstream(timeout=2.0).purge_stream(stack.topology.stream)
    finally:
        await client.close()
    async with running_worker(stack, handler, reap_interval=0.2):
        await wait_status(stack, task.id, pb.TASK_STATUS_SUCCEEDED, within=10)
    assert handler.calls[task.payload["notification_id"]] == 1


async def test_a_task_recorded_but_never_published_is_published_by_the_reaper(stack) -> None:
    # The crash between writing the record and publishing its message.
    handler = ScriptedHandler()
    async with task_store(stack) as store:
        task = await stage_task(store)
        leftover = pb.Task(id=str(uuid.uuid4()), org_id="acme")  # marker, record never written
        await OpenTasks(store).publishing(leftover)
        async with running_worker(stack, handler, reap_interval=0.2):
            done = await wait_status(stack, task.id, pb.TASK_STATUS_SUCCEEDED, within=10)

            async def cleared() -> None:
                assert await OpenTasks(store).listing() == []

            await assert_eventually(cleared, timeout=10)
    assert done.attempts[0].worker == "w1"
    assert handler.effects[task.id] == 1


async def test_cancel_stops_a_handler_that_never_checks(stack) -> None:
    nid = str(uuid.uuid4())
    handler = ScriptedHandler(scripts={nid: Script(release=asyncio.Event())})  # never set
    task = await publish_email(stack, nid)
    async with running_worker(stack, handler, lease_ttl=0.6):
        await asyncio.wait_for(handler.started_event(nid).wait(), 10)
        await stack.stub.CancelTask(pb.CancelTaskRequest(task_id=task.id), metadata=ALICE)
        done = await wait_status(stack, task.id, pb.TASK_STATUS_CANCELLED, within=5)
    assert done.error == "cancelled while running"
    assert done.attempts[0].HasField("ended_at")
    assert task.id not in handler.effects


async def test_retry_and_cancel_accept_a_task_whose_worker_died(stack) -> None:
    handler = ScriptedHandler()
    retried, cancelled = await publish_email(stack), await publish_email(stack)
    async with task_store(stack) as store:
        for task in (retried, cancelled):
            await store.change(task.org_id, task.id, abandon)
    gone = (
        await stack.stub.CancelTask(pb.CancelTaskRequest(task_id=cancelled.id), metadata=ALICE)
    ).task
    assert gone.status == pb.TASK_STATUS_CANCELLED
    assert gone.attempts[0].error == "worker stopped responding"
    again = (
        await stack.stub.RetryTask(pb.RetryTaskRequest(task_id=retried.id), metadata=ALICE)
    ).task
    assert again.status == pb.TASK_STATUS_PENDING
    async with running_worker(stack, handler):
        await wait_status(stack, retried.id, pb.TASK_STATUS_SUCCEEDED)
    assert cancelled.id not in handler.effects


async def stage_task(store: TaskStore) -> pb.Task:
    """A pending email task written straight to the bucket, with no work message."""
    task = pb.Task(
        id=new_task_id(),
        type=pb.TASK_TYPE_EMAIL,
        status=pb.TASK_STATUS_PENDING,
        org_id="acme",
        created_by="alice",
        max_attempts=3,
        version=1,
    )
    task.payload.update({"notification_id": str(uuid.uuid4())})
    await OpenTasks(store).publishing(task)
    await store.create(task)
    return task


async def queue_depth(stack: TaskStack, js: JetStreamContext) -> int:
    """Messages the email consumer has not seen acknowledged, and what the stream still holds."""
    consumer = await js.consumer_info(stack.topology.stream, stack.topology.consumer(EMAIL))
    stream = await js.stream_info(stack.topology.stream)
    return max(consumer.num_pending + consumer.num_ack_pending, stream.state.messages)


async def test_a_worker_that_lost_its_lease_stops_and_records_nothing(stack) -> None:
    nid = str(uuid.uuid4())
    release = asyncio.Event()
    handler = ScriptedHandler(scripts={nid: Script(release=release)})
    task = await publish_email(stack, nid)
    async with running_worker(stack, handler, lease_ttl=0.6, worker_id="slow") as worker:
        await asyncio.wait_for(handler.started_event(nid).wait(), 10)
        async with task_store(stack) as store:

            def stolen(record: pb.Task) -> None:  # as if "slow" had lapsed and "thief" took over
                record.attempts[-1].ended_at.GetCurrentTime()
                record.attempts[-1].error = "worker stopped responding"
                attempt = record.attempts.add(number=2, worker="thief")
                attempt.lease_expires_at.FromSeconds(int(time.time()) + 3600)

            await store.change(task.org_id, task.id, stolen)

            async def stopped() -> None:
                lost = worker.metrics.finished.labels(type="email", outcome="lease_lost")
                assert lost._value.get() == 1

            await assert_eventually(stopped, timeout=5)
            record = await store.get(task.org_id, task.id)
    assert record.status == pb.TASK_STATUS_RUNNING
    assert [a.worker for a in record.attempts] == ["slow", "thief"]
    assert task.id not in handler.effects


def test_lease_rules_for_records_without_one() -> None:
    legacy = pb.Task(status=pb.TASK_STATUS_RUNNING)
    legacy.attempts.add(number=1, worker="old")  # written before leases existed
    assert lease.is_stale(legacy)
    assert lease.lease_remaining(pb.Task(status=pb.TASK_STATUS_PENDING)) == 0.0
    last_try = pb.Task(status=pb.TASK_STATUS_RUNNING, retry_count=2)
    last_try.attempts.add(number=3, worker="dead")
    lease.claim("w1", 30.0, max_attempts=3)(last_try)
    assert last_try.status == pb.TASK_STATUS_FAILED
    assert "gave up after 3 attempts" in last_try.error
    with pytest.raises(lease.LeaseLost):
        lease.check_owner(last_try, "w1", 3)


async def test_the_worker_removes_a_final_tasks_marker_without_the_reaper(stack) -> None:
    # The reaper used to remove every finished task's marker, a get and a delete each, one at
    # a time; the worker that records the outcome now removes it with one message.
    handler = ScriptedHandler()
    done, failed = await publish_email(stack), await publish_email(stack)
    handler.scripts[failed.payload["notification_id"]] = Script(permanent=True)
    async with task_store(stack) as store:
        assert {m.task_id for m in await OpenTasks(store).listing()} == {
            done.id,
            failed.id,
        }
        async with running_worker(stack, handler):  # no reaper
            await wait_status(stack, done.id, pb.TASK_STATUS_SUCCEEDED)
            await wait_status(stack, failed.id, pb.TASK_STATUS_FAILED)

            async def closed() -> None:
                assert await OpenTasks(store).listing() == []

            await assert_eventually(closed, timeout=5)


async def stage_tombstones(store: TaskStore, count: int) -> None:
    """Markers of tasks that finished: what a worker's delete leaves, one each."""
    tasks = [pb.Task(id=new_task_id(), org_id="acme") for _ in range(count)]
    await asyncio.gather(*(OpenTasks(store).publishing(task) for task in tasks))
    await asyncio.gather(*(store.kv.delete(marker_key(task.org_id, task.id)) for task in tasks))


async def test_a_sweep_removes_tombstones_and_no_live_marker(stack) -> None:
    async with task_store(stack) as store:
        open_tasks = OpenTasks(store)
        live = []
        for _ in range(4):
            await stage_tombstones(store, 3)
            live.append(await stage_task(store))
        await stage_tombstones(store, 2)
        survey = await open_tasks.survey()
        assert (len(survey.markers), len(survey.tombstones)) == (4, 14)
        before = {m.task_id: m for m in survey.markers}
        # Written while the sweep is under way: a new marker, one turned to queued.
        late = await stage_task(store)
        assert await open_tasks.requeued(before[live[0].id])
        assert await open_tasks.sweep(survey) == 14
        after = {m.task_id: m for m in await open_tasks.listing()}
        assert set(after) == {task.id for task in live} | {late.id}
        assert len(await store.bucket_stream.keys("o.*.*")) == 5  # not a tombstone left
        assert after[live[0].id].queued
        for task in live[1:]:  # written again as they were, at a new revision
            assert (after[task.id].state, after[task.id].since) == (
                before[task.id].state,
                before[task.id].since,
            )
            assert after[task.id].revision > survey.last_revision


async def test_a_sweep_rewrites_at_most_its_budget_of_live_markers(
    stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outbox, "_SWEEP_REWRITES", 2)
    async with task_store(stack) as store:
        open_tasks = OpenTasks(store)
        revisions = []
        for _ in range(4):
            await stage_tombstones(store, 2)
            task = await stage_task(store)
            revisions.append(await open_tasks.publishing(task))  # its marker's revision
        survey = await open_tasks.survey()
        # The cut stops at the third oldest live marker: the tombstones before it go.
        assert await open_tasks.sweep(survey) == 6
        after = sorted(m.revision for m in await open_tasks.listing())
        assert after[:2] == revisions[2:]  # the two past the cut kept their revision
        assert len((await open_tasks.survey()).tombstones) == 2


async def test_a_reaper_pass_sweeps_and_the_reaper_closes_what_it_rewrote(stack) -> None:
    release = asyncio.Event()
    handler = ScriptedHandler()
    async with task_store(stack) as store:
        await stage_tombstones(store, 1000)  # ReaperSettings.sweep_after
        task = await publish_email(stack)
        handler.scripts[task.payload["notification_id"]] = Script(release=release)
        first = {m.task_id: m.revision for m in await OpenTasks(store).listing()}[task.id]
        async with running_worker(stack, handler, reap_interval=0.2):

            async def swept() -> None:
                survey = await OpenTasks(store).survey()
                assert survey.tombstones == []
                # The running task's marker was written again to let the cut pass it.
                (marker,) = survey.markers
                assert (marker.task_id, marker.revision > first) == (task.id, True)

            await assert_eventually(swept, timeout=10)
            release.set()
            await wait_status(stack, task.id, pb.TASK_STATUS_SUCCEEDED)

            # Its worker's delete names the first revision and misses; the reaper closes it.
            async def closed() -> None:
                assert await OpenTasks(store).listing() == []

            await assert_eventually(closed, timeout=10)


async def test_a_marker_written_again_since_the_publish_outlives_the_task_it_named(stack) -> None:
    # RetryTask or the reaper wrote the marker again after the message was queued: the
    # worker's removal names the old revision and leaves the new one to whoever wrote it.
    handler = ScriptedHandler()
    task = await publish_email(stack)
    async with task_store(stack) as store:
        rewritten = await OpenTasks(store).queued(task)
        async with running_worker(stack, handler):
            await wait_status(stack, task.id, pb.TASK_STATUS_SUCCEEDED)
            await asyncio.sleep(0.3)  # time for a removal to land, were one sent
        (marker,) = await OpenTasks(store).listing()
    assert (marker.task_id, marker.revision, marker.queued) == (task.id, rewritten, True)
