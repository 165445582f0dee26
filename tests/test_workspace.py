"""Workspace provisioning: rendered manifests, server-side apply against a stand-in API."""

from __future__ import annotations

import uuid

import kubernetes_validate
import pytest

from devtools.servers import NatsServer, free_port
from opsmesh.task.v1 import task_pb2 as pb
from task_svc.workspace import KubeClient, KubeSettings, namespace_name, render, workspace_handler
from tests.helpers import identity
from tests.kube_standin import KubeStandIn
from tests.taskkit import running_worker, task_stack
from tests.test_task_service import wait_status

ALICE = identity("alice", "acme@example.com")
KINDS = [
    "LimitRange",
    "Namespace",
    "NetworkPolicy",
    "ResourceQuota",
    "RoleBinding",
    "ServiceAccount",
]


@pytest.mark.parametrize(
    "payload",
    [
        {"workspace": "team-a"},
        {
            "workspace": "a" * 40,
            "quota": {"cpu": "500m", "memory": "2Gi", "storage": "1Ti", "pods": 7.0},
        },
    ],
)
def test_rendered_manifests_are_valid_kubernetes_objects(payload) -> None:
    manifests = render("org+weird@chars.example", payload)
    assert sorted(m["kind"] for m in manifests) == KINDS
    for manifest in manifests:
        kubernetes_validate.validate(manifest, "1.37.0", strict=True)
    namespace = manifests[0]["metadata"]["name"]
    assert len(namespace) <= 63
    assert all(m["metadata"].get("namespace", namespace) == namespace for m in manifests)
    assert (
        manifests[0]["metadata"]["annotations"]["opsmesh.dev/org-id"] == "org+weird@chars.example"
    )


def test_each_org_gets_its_own_namespace_for_the_same_workspace_name() -> None:
    assert namespace_name("acme", "team-a") != namespace_name("globex", "team-a")


@pytest.fixture
def kube():
    standin = KubeStandIn().start()
    yield standin
    standin.stop()


def publish_request(
    action: int, workspace: str = "team-a", **quota
) -> pb.PublishWorkspaceTaskRequest:
    return pb.PublishWorkspaceTaskRequest(
        payload=pb.WorkspaceTaskPayload(
            action=action, workspace=workspace, quota=pb.WorkspaceQuota(**quota)
        ),
        idempotency_key=str(uuid.uuid4()),
    )


async def test_provision_applies_every_object_idempotently_then_deprovision(
    nats_server: NatsServer, kube: KubeStandIn
) -> None:
    client = KubeClient(KubeSettings(api=kube.url))
    handler = workspace_handler(client)
    async with (
        task_stack(nats_server.url) as stack,
        running_worker(stack, handler, types=(pb.TASK_TYPE_WORKSPACE,)),
    ):
        first = (
            await stack.stub.PublishWorkspaceTask(
                publish_request(pb.WORKSPACE_ACTION_PROVISION, memory="2Gi"), metadata=ALICE
            )
        ).task
        done = await wait_status(stack, first.id, pb.TASK_STATUS_SUCCEEDED, who=ALICE)
        assert kube.kinds() == KINDS
        assert (done.progress.steps_done, done.progress.steps_total) == (6, 6)
        assert done.progress.step == "workspace ready"
        patches = [r for r in kube.requests if r[0] == "PATCH"]
        assert all(r[3] == "application/apply-patch+yaml" for r in patches)
        assert all(r[2]["fieldManager"] == ["opsmesh-task-worker"] for r in patches)
        quota = next(o for o in kube.objects.values() if o["kind"] == "ResourceQuota")
        assert quota["spec"]["hard"]["limits.memory"] == "2Gi"
        assert quota["spec"]["hard"]["limits.cpu"] == "4"

        again = (
            await stack.stub.PublishWorkspaceTask(
                publish_request(pb.WORKSPACE_ACTION_PROVISION, memory="2Gi"), metadata=ALICE
            )
        ).task
        await wait_status(stack, again.id, pb.TASK_STATUS_SUCCEEDED, who=ALICE)
        assert kube.kinds() == KINDS, "applying twice converges to the same objects"

        gone = (
            await stack.stub.PublishWorkspaceTask(
                publish_request(pb.WORKSPACE_ACTION_DEPROVISION), metadata=ALICE
            )
        ).task
        removed = await wait_status(stack, gone.id, pb.TASK_STATUS_SUCCEEDED, who=ALICE)
        assert removed.progress.step == "deleted"
        assert kube.kinds() == []
        twice = (
            await stack.stub.PublishWorkspaceTask(
                publish_request(pb.WORKSPACE_ACTION_DEPROVISION), metadata=ALICE
            )
        ).task
        assert (
            await wait_status(stack, twice.id, pb.TASK_STATUS_SUCCEEDED, who=ALICE)
        ).progress.step == "already gone"
    await client.close()


async def test_api_errors_retry_when_transient_and_fail_when_permanent(
    nats_server: NatsServer, kube: KubeStandIn
) -> None:
    client = KubeClient(KubeSettings(api=kube.url))
    async with (
        task_stack(nats_server.url) as stack,
        running_worker(stack, workspace_handler(client), types=(pb.TASK_TYPE_WORKSPACE,)),
    ):
        kube.fail_next[:] = [(503, "etcd is busy")]
        task = (
            await stack.stub.PublishWorkspaceTask(
                publish_request(pb.WORKSPACE_ACTION_PROVISION), metadata=ALICE
            )
        ).task
        done = await wait_status(stack, task.id, pb.TASK_STATUS_SUCCEEDED, who=ALICE)
        assert done.retry_count == 1
        assert "HTTP 503 etcd is busy" in done.attempts[0].error

        kube.fail_next[:] = [(422, "ResourceQuota is invalid: spec.hard[pods]")]
        bad = (
            await stack.stub.PublishWorkspaceTask(
                publish_request(pb.WORKSPACE_ACTION_PROVISION, workspace="team-b"), metadata=ALICE
            )
        ).task
        failed = await wait_status(stack, bad.id, pb.TASK_STATUS_FAILED, who=ALICE)
        assert len(failed.attempts) == 1
        assert "HTTP 422 ResourceQuota is invalid" in failed.error
    await client.close()


async def test_unreachable_api_is_retried_then_dead_lettered(nats_server: NatsServer) -> None:
    client = KubeClient(KubeSettings(api=f"http://127.0.0.1:{free_port()}", timeout=1.0))
    async with (
        task_stack(nats_server.url) as stack,
        running_worker(stack, workspace_handler(client), types=(pb.TASK_TYPE_WORKSPACE,)),
    ):
        task = (
            await stack.stub.PublishWorkspaceTask(
                publish_request(pb.WORKSPACE_ACTION_PROVISION), metadata=ALICE
            )
        ).task
        failed = await wait_status(stack, task.id, pb.TASK_STATUS_FAILED, who=ALICE)
    assert "Kubernetes API unreachable" in failed.error
    assert "gave up after 3 attempts" in failed.error
    await client.close()
