"""The operations agent's tools: workspaces and tasks, through task_svc as the calling user.

Reading runs at once; provisioning and deprovisioning change the platform, so
they wait for the user's approval (the agent loop asks before ``run``). The
task service decides what the user may do: the tools forward the user's own
credentials and never name an organization themselves.
"""

from __future__ import annotations

from typing import Any, Literal

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from grpc import aio
from pydantic import BaseModel, Field

from chat_svc.agents.tools import Tool, ToolContext, ToolFailure, ToolOutput, tool
from mesh.downstream import Deadline
from opsmesh.task.v1 import task_pb2, task_pb2_grpc

_WORKSPACE = r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$"
_STATUS_NAMES = {
    value.number: value.name.removeprefix("TASK_STATUS_").lower()
    for value in task_pb2.TaskStatus.DESCRIPTOR.values
}
_TYPE_NAMES = {
    value.number: value.name.removeprefix("TASK_TYPE_").lower()
    for value in task_pb2.TaskType.DESCRIPTOR.values
}
_STATUS_FILTER = {name: number for number, name in _STATUS_NAMES.items() if number}


class ProvisionArgs(BaseModel):
    workspace: str = Field(
        pattern=_WORKSPACE, description="Workspace name: lowercase letters, digits and '-'"
    )
    cpu: str | None = Field(default=None, max_length=16, description='CPU limit, e.g. "4"')
    memory: str | None = Field(default=None, max_length=16, description='Memory, e.g. "8Gi"')
    storage: str | None = Field(default=None, max_length=16, description='Storage, e.g. "50Gi"')


class WorkspaceArgs(BaseModel):
    workspace: str = Field(pattern=_WORKSPACE, description="Workspace name")


class TaskArgs(BaseModel):
    task_id: str = Field(min_length=1, max_length=64, description="Task id (a UUID)")


class ListTasksArgs(BaseModel):
    status: Literal["pending", "running", "retrying", "succeeded", "failed", "cancelled"] | None = (
        Field(default=None, description="Only tasks in this status")
    )
    limit: int = Field(default=10, ge=1, le=50, description="How many tasks, newest first")


def task_payload(task: task_pb2.Task) -> dict[str, Any]:
    """The task's typed input (``Task.workspace`` or ``Task.email``) as plain data, with the
    contract's field names and integers as integers; empty when the task carries none."""
    which = task.WhichOneof("typed_payload")
    if which is None:
        return {}
    typed: Message = getattr(task, which)
    return json_format.MessageToDict(typed, preserving_proto_field_name=True)


def describe_task(task: task_pb2.Task) -> dict[str, Any]:
    """A task as plain data, the way the model and the client read it."""
    described: dict[str, Any] = {
        "task_id": task.id,
        "type": _TYPE_NAMES.get(task.type, "unknown"),
        "status": _STATUS_NAMES.get(task.status, "unknown"),
        "payload": task_payload(task),
        "retry_count": task.retry_count,
        "created_at": task.created_at.ToJsonString(),
        "updated_at": task.updated_at.ToJsonString(),
    }
    if task.error:
        described["error"] = task.error
    if task.progress.step:
        described["progress"] = (
            f"{task.progress.step} ({task.progress.steps_done}/{task.progress.steps_total})"
        )
    return described


def _task_line(task: task_pb2.Task) -> str:
    facts = describe_task(task)
    line = f"- task {facts['task_id']}: {facts['type']} {facts['status']}"
    workspace = facts["payload"].get("workspace")
    if workspace:
        line += f" (workspace {workspace}, {facts['payload'].get('action', '').lower()})"
    if task.error:
        line += f"; error: {task.error}"
    return line + f"; updated {facts['updated_at']}"


def _failure(error: aio.AioRpcError, what: str) -> ToolFailure:
    code = error.code()
    if code == grpc.StatusCode.NOT_FOUND:
        return ToolFailure(f"{what}: not found in the user's organization")
    if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        return ToolFailure(f"{what}: the user may not do this ({error.details()})")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return ToolFailure(f"{what}: refused: {error.details()}")
    return ToolFailure(f"{what}: the task service is unavailable ({code.name})")


async def read_task(
    tasks: task_pb2_grpc.TaskServiceAsyncStub, task_id: str, context: ToolContext
) -> task_pb2.Task:
    """One task as the calling user may see it, or ToolFailure saying why not."""
    try:
        reply = await tasks.GetTask(
            task_pb2.GetTaskRequest(task_id=task_id),
            metadata=context.metadata,
            timeout=Deadline.LOOKUP,
        )
    except aio.AioRpcError as error:
        raise _failure(error, f"task {task_id}") from None
    return reply.task


def operations_tools(tasks: task_pb2_grpc.TaskServiceAsyncStub | None) -> list[Tool[Any]]:
    if tasks is None:
        return []

    async def publish(
        context: ToolContext, action: int, workspace: str, quota: task_pb2.WorkspaceQuota | None
    ) -> ToolOutput:
        payload = task_pb2.WorkspaceTaskPayload(action=action, workspace=workspace)  # type: ignore[arg-type]
        if quota is not None:
            payload.quota.CopyFrom(quota)
        try:
            reply = await tasks.PublishWorkspaceTask(
                task_pb2.PublishWorkspaceTaskRequest(
                    payload=payload, idempotency_key=context.idempotency_key
                ),
                metadata=context.metadata,
                timeout=Deadline.LOOKUP,
            )
        except aio.AioRpcError as error:
            raise _failure(error, f"workspace {workspace}") from None
        facts = describe_task(reply.task)
        return ToolOutput(
            text=f"Started task {facts['task_id']} ({facts['status']}) for workspace {workspace}.",
            data={"kind": "task", "task": facts},
        )

    @tool(
        changes_state=True,
        describe=lambda a: (
            f"Create workspace {a.workspace!r}"
            + (
                " with "
                + ", ".join(
                    f"{k} {v}"
                    for k, v in a.model_dump(exclude_none=True).items()
                    if k != "workspace"
                )
                if a.model_dump(exclude_none=True).keys() - {"workspace"}
                else " with the default quota"
            )
        ),
    )
    async def provision_workspace(args: ProvisionArgs, context: ToolContext) -> ToolOutput:
        """Creates a workspace (a namespace with a resource quota) for the user's organization, or
        brings an existing one back to its declared state. Needs the user's approval."""
        quota = task_pb2.WorkspaceQuota(
            cpu=args.cpu or "", memory=args.memory or "", storage=args.storage or ""
        )
        return await publish(context, task_pb2.WORKSPACE_ACTION_PROVISION, args.workspace, quota)

    @tool(
        changes_state=True,
        describe=lambda a: f"Delete workspace {a.workspace!r} and everything in it",
    )
    async def deprovision_workspace(args: WorkspaceArgs, context: ToolContext) -> ToolOutput:
        """Removes a workspace and everything in it. Needs the user's approval."""
        return await publish(context, task_pb2.WORKSPACE_ACTION_DEPROVISION, args.workspace, None)

    async def recent(context: ToolContext, **filters: Any) -> list[task_pb2.Task]:
        try:
            reply = await tasks.ListTasks(
                task_pb2.ListTasksRequest(**filters),
                metadata=context.metadata,
                timeout=Deadline.LOOKUP,
            )
        except aio.AioRpcError as error:
            raise _failure(error, "task list") from None
        return list(reply.tasks)

    @tool()
    async def workspace_status(args: WorkspaceArgs, context: ToolContext) -> ToolOutput:
        """Tells whether a workspace exists, from the latest task that provisioned or removed it."""
        found = [
            task
            for task in await recent(context, page_size=100, types=[task_pb2.TASK_TYPE_WORKSPACE])
            if task.HasField("workspace") and task.workspace.workspace == args.workspace
        ]
        if not found:
            return ToolOutput(text=f"No task ever provisioned workspace {args.workspace}.")
        latest = found[0]
        facts = describe_task(latest)
        action = str(facts["payload"].get("action", "")).removeprefix("WORKSPACE_ACTION_")
        if action == "PROVISION" and facts["status"] == "succeeded":
            state = "exists (provisioned)"
        elif action == "DEPROVISION" and facts["status"] == "succeeded":
            state = "removed"
        else:
            state = f"{action.lower()} is {facts['status']}"
        return ToolOutput(
            text=f"Workspace {args.workspace}: {state}.\nLatest task:\n{_task_line(latest)}",
            data={"kind": "task", "task": facts},
        )

    @tool()
    async def get_task(args: TaskArgs, context: ToolContext) -> ToolOutput:
        """Reads one task: type, status, progress, error and attempts."""
        task = await read_task(tasks, args.task_id, context)
        facts = describe_task(task)
        attempts = [
            f"  attempt {a.number} on {a.worker or '?'}: {a.error or 'ok'}" for a in task.attempts
        ]
        return ToolOutput(
            text="\n".join([_task_line(task), *attempts]),
            data={"kind": "task", "task": facts},
        )

    @tool()
    async def list_tasks(args: ListTasksArgs, context: ToolContext) -> ToolOutput:
        """Lists the organization's recent tasks, newest first."""
        filters: dict[str, Any] = {"page_size": args.limit}
        if args.status is not None:
            filters["statuses"] = [_STATUS_FILTER[args.status]]
        found = await recent(context, **filters)
        if not found:
            return ToolOutput(text="No tasks.")
        return ToolOutput(
            text=f"{len(found)} tasks, newest first:\n" + "\n".join(map(_task_line, found)),
            data={"kind": "tasks", "tasks": [describe_task(task) for task in found]},
        )

    return [provision_workspace, deprovision_workspace, workspace_status, get_task, list_tasks]
