"""Agents end to end: chat_svc with real Redis, chDB, session and task services, and the Ollama
stand-in replaying a model's tool calls in Ollama's wire format."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import grpc
import pytest
from grpc import aio
from ollama._types import ChatRequest

from chat_svc.agents.catalog import AgentLimits
from chat_svc.agents.operations import describe_task
from chat_svc.agents.wiring import AgentDependencies
from chat_svc.server import build_runner
from devtools.servers import NatsServer, RedisServer
from mesh.server import ServiceRunner
from opsmesh.chat.v1 import chat_pb2 as pb
from opsmesh.chat.v1 import chat_pb2_grpc
from opsmesh.session.v1 import session_pb2, session_pb2_grpc
from opsmesh.task.v1 import task_pb2
from tests.conftest import FAST_HEALTH
from tests.helpers import assert_eventually, identity
from tests.monitoring_fixtures import Monitoring, monitoring  # noqa: F401 - a fixture
from tests.ollama_standin import OllamaStandIn, Reply
from tests.taskkit import TaskStack, task_stack
from tests.test_chat import ChatStack, chat_settings, collect, new_session


@dataclass
class AgentStack(ChatStack):
    tasks: TaskStack
    settings: Any


@pytest.fixture
async def agents(
    session_runner: ServiceRunner,
    redis_server: RedisServer,
    nats_server: NatsServer,
    history_dsn: str,
) -> AsyncIterator[AgentStack]:
    ollama = await OllamaStandIn().start()
    async with task_stack(nats_server.url) as tasks:
        settings = replace(
            chat_settings(session_runner, redis_server.url, history_dsn, ollama.url),
            task_address=f"127.0.0.1:{tasks.runner.port}",
            agent_limits=AgentLimits(max_tool_rounds=3, approval_timeout=30.0, tool_timeout=5.0),
        )
        runner = await build_runner(settings, options=FAST_HEALTH)
        await runner.start()
        who = identity(f"u{uuid.uuid4().hex[:8]}", f"org{uuid.uuid4().hex[:6]}")
        try:
            async with (
                aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel,
                aio.insecure_channel(f"127.0.0.1:{session_runner.port}") as session_channel,
            ):
                yield AgentStack(
                    chat_pb2_grpc.ChatServiceStub(channel),
                    session_pb2_grpc.SessionServiceStub(session_channel),
                    ollama,
                    runner,
                    who,
                    tasks,
                    settings,
                )
        finally:
            await runner.stop()
            await ollama.stop()


@asynccontextmanager
async def replica(settings: Any) -> AsyncIterator[chat_pb2_grpc.ChatServiceStub]:
    """Another chat_svc with these settings, on the same Redis and history."""
    runner = await build_runner(settings, options=FAST_HEALTH)
    await runner.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel:
            yield chat_pb2_grpc.ChatServiceStub(channel)
    finally:
        await runner.stop()


def ask(
    session_id: str, text: str, agent: int = pb.AGENT_OPERATIONS, **more: Any
) -> pb.StreamChatRequest:
    return pb.StreamChatRequest(session_id=session_id, message=text, agent=agent, **more)  # type: ignore[arg-type]


def kinds(events: list[pb.StreamChatResponse]) -> list[str]:
    return [e.WhichOneof("event") or "" for e in events]


def answer_text(events: list[pb.StreamChatResponse]) -> str:
    return "".join(e.delta.content for e in events if e.HasField("delta"))


async def read_until(
    call: Any, kind: str, into: list[pb.StreamChatResponse]
) -> pb.StreamChatResponse:
    async for event in call:
        into.append(event)
        if event.WhichOneof("event") == kind:
            return event
    raise AssertionError(f"the stream ended before a {kind} event: {kinds(into)}")


async def org_tasks(stack: AgentStack) -> list[task_pb2.Task]:
    reply = await stack.tasks.stub.ListTasks(task_pb2.ListTasksRequest(), metadata=stack.who)
    return list(reply.tasks)


PROVISION = Reply(tool_calls=[("provision_workspace", {"workspace": "team-x", "cpu": "2"})])


async def test_provisioning_asks_for_approval_then_runs_and_the_model_reads_the_result(
    agents: AgentStack,
) -> None:
    agents.ollama.scenario.script = [
        PROVISION,
        Reply(tokens=["Workspace ", "team-x ", "is on its way."]),
    ]
    session_id = await new_session(agents)
    call = agents.stub.StreamChat(
        ask(session_id, "provision a workspace for team X"), metadata=agents.who
    )
    events: list[pb.StreamChatResponse] = []
    approval = await read_until(call, "approval_required", events)
    assert kinds(events) == ["started", "tool_call", "approval_required"]
    tool_call = events[1].tool_call
    assert tool_call.name == "provision_workspace"
    assert tool_call.requires_approval
    assert dict(tool_call.arguments) == {"workspace": "team-x", "cpu": "2"}
    assert "team-x" in approval.approval_required.description
    assert approval.approval_required.deadline.seconds > 0
    assert await org_tasks(agents) == []  # nothing ran before the approval

    decided = await agents.stub.DecideToolCall(
        pb.DecideToolCallRequest(
            generation_id=events[0].started.generation_id,
            tool_call_id=tool_call.tool_call_id,
            approved=True,
        ),
        metadata=agents.who,
    )
    assert decided.accepted
    events += [event async for event in call]
    assert kinds(events)[3] == "tool_result"
    assert kinds(events)[-1] == "completed"
    assert set(kinds(events)[4:-1]) == {"delta"}
    result = next(e.tool_result for e in events if e.HasField("tool_result"))
    assert not result.is_error, result.content
    assert result.data["kind"] == "task"
    task_id = result.data["task"]["task_id"]
    assert [t.id for t in await org_tasks(agents)] == [task_id]
    assert answer_text(events) == "Workspace team-x is on its way."
    assert events[-1].completed.done_reason == pb.DONE_REASON_STOP

    first, second = (seen.body for seen in agents.ollama.requests[-2:])
    ChatRequest.model_validate(first)  # the request is what the ollama client itself would send
    offered = {tool["function"]["name"] for tool in first["tools"]}
    assert {"provision_workspace", "deprovision_workspace", "list_tasks"} <= offered
    assert first["messages"][0]["role"] == "system"
    tool_message = second["messages"][-1]
    assert tool_message["role"] == "tool"
    assert tool_message["tool_name"] == "provision_workspace"
    assert task_id in tool_message["content"]
    assert second["messages"][-2]["tool_calls"][0]["function"]["name"] == "provision_workspace"

    # A second decision on the same call is refused politely.
    again = await agents.stub.DecideToolCall(
        pb.DecideToolCallRequest(
            generation_id=events[0].started.generation_id,
            tool_call_id=tool_call.tool_call_id,
            approved=False,
        ),
        metadata=agents.who,
    )
    assert not again.accepted

    async def recorded() -> pb.ChatMessage:
        page = await agents.stub.GetHistory(
            pb.GetHistoryRequest(session_id=session_id), metadata=agents.who
        )
        assert len(page.messages) == 2
        return page.messages[0]

    stored = await assert_eventually(recorded)
    assert stored.metadata["agent"] == "operations"
    (entry,) = stored.metadata["tools"]
    assert entry["name"] == "provision_workspace"
    assert entry["approval"]["decision"] == "approved"
    assert entry["result"]["data"]["task"]["task_id"] == task_id


async def test_a_rejected_call_never_runs_and_the_model_is_told_why(agents: AgentStack) -> None:
    agents.ollama.scenario.script = [PROVISION, Reply(tokens=["Understood."])]
    session_id = await new_session(agents)
    call = agents.stub.StreamChat(ask(session_id, "provision team-x"), metadata=agents.who)
    events: list[pb.StreamChatResponse] = []
    await read_until(call, "approval_required", events)
    await agents.stub.DecideToolCall(
        pb.DecideToolCallRequest(
            generation_id=events[0].started.generation_id,
            tool_call_id=events[1].tool_call.tool_call_id,
            approved=False,
            reason="not this week",
        ),
        metadata=agents.who,
    )
    events += [event async for event in call]
    result = next(e.tool_result for e in events if e.HasField("tool_result"))
    assert result.is_error
    assert "rejected" in result.content
    assert "not this week" in result.content
    assert await org_tasks(agents) == []
    assert "rejected" in agents.ollama.requests[-1].body["messages"][-1]["content"]


async def test_an_undecided_call_expires_and_late_decisions_are_not_accepted(
    agents: AgentStack,
) -> None:
    async with replica(
        replace(agents.settings, agent_limits=AgentLimits(approval_timeout=1.0))
    ) as stub:
        agents.ollama.scenario.script = [
            PROVISION,
            Reply(tokens=["No decision, nothing done."]),
        ]
        session_id = await new_session(agents)
        events = await collect(stub.StreamChat(ask(session_id, "provision"), metadata=agents.who))
        result = next(e.tool_result for e in events if e.HasField("tool_result"))
        assert result.is_error
        assert "deadline" in result.content
        late = await stub.DecideToolCall(
            pb.DecideToolCallRequest(
                generation_id=events[0].started.generation_id,
                tool_call_id=events[1].tool_call.tool_call_id,
                approved=True,
            ),
            metadata=agents.who,
        )
        assert not late.accepted
        assert await org_tasks(agents) == []


async def test_decisions_come_from_any_replica_and_only_from_the_owner(agents: AgentStack) -> None:
    async with replica(agents.settings) as other:
        agents.ollama.scenario.script = [PROVISION, Reply(tokens=["Done."])]
        session_id = await new_session(agents)
        call = agents.stub.StreamChat(ask(session_id, "provision"), metadata=agents.who)
        events: list[pb.StreamChatResponse] = []
        await read_until(call, "approval_required", events)
        decision = pb.DecideToolCallRequest(
            generation_id=events[0].started.generation_id,
            tool_call_id=events[1].tool_call.tool_call_id,
            approved=True,
        )
        for stranger in (
            identity("mallory", dict(agents.who)["x-opsmesh-org-id"]),
            identity(dict(agents.who)["x-opsmesh-user-id"], "evilcorp"),
        ):
            with pytest.raises(aio.AioRpcError) as caught:
                await other.DecideToolCall(decision, metadata=stranger)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        for bad, field in (
            (pb.DecideToolCallRequest(generation_id="nope", tool_call_id="x"), "generation_id"),
            (pb.DecideToolCallRequest(generation_id=str(uuid.uuid4())), "tool_call_id"),
            (
                pb.DecideToolCallRequest(
                    generation_id=str(uuid.uuid4()), tool_call_id="x", reason="r" * 2000
                ),
                "reason",
            ),
        ):
            with pytest.raises(aio.AioRpcError) as caught:
                await other.DecideToolCall(bad, metadata=agents.who)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert (await other.DecideToolCall(decision, metadata=agents.who)).accepted
        events += [event async for event in call]
        assert events[-1].HasField("completed")
        assert len(await org_tasks(agents)) == 1


async def test_an_approval_survives_the_client_leaving_and_the_answer_lands_in_history(
    agents: AgentStack,
) -> None:
    agents.ollama.scenario.script = [PROVISION, Reply(tokens=["Provisioning started."])]
    session_id = await new_session(agents)
    request = ask(session_id, "provision", client_message_id=str(uuid.uuid4()))
    call = agents.stub.StreamChat(request, metadata=agents.who)
    events: list[pb.StreamChatResponse] = []
    await read_until(call, "approval_required", events)
    call.cancel()  # the browser tab is closed

    async def still_waiting() -> pb.ListApprovalsResponse:
        listed = await agents.stub.ListApprovals(
            pb.ListApprovalsRequest(session_id=session_id), metadata=agents.who
        )
        assert len(listed.approvals) == 1
        return listed

    listed = await assert_eventually(still_waiting)
    pending = listed.approvals[0]
    assert pending.generation_id == events[0].started.generation_id
    assert pending.approval.name == "provision_workspace"
    assert dict(pending.approval.arguments)["workspace"] == "team-x"
    other_org = identity(dict(agents.who)["x-opsmesh-user-id"], "evilcorp")
    assert not (
        await agents.stub.ListApprovals(
            pb.ListApprovalsRequest(session_id=session_id), metadata=other_org
        )
    ).approvals
    decided = await agents.stub.DecideToolCall(
        pb.DecideToolCallRequest(
            generation_id=pending.generation_id,
            tool_call_id=pending.approval.tool_call_id,
            approved=True,
        ),
        metadata=agents.who,
    )
    assert decided.accepted

    async def answered() -> pb.ChatMessage:
        page = await agents.stub.GetHistory(
            pb.GetHistoryRequest(session_id=session_id), metadata=agents.who
        )
        assert len(page.messages) == 2
        return page.messages[0]

    stored = await assert_eventually(answered)
    assert stored.content == "Provisioning started."
    assert not stored.incomplete
    assert stored.metadata["tools"][0]["approval"]["decision"] == "approved"
    assert len(await org_tasks(agents)) == 1
    assert not (
        await agents.stub.ListApprovals(
            pb.ListApprovalsRequest(session_id=session_id), metadata=agents.who
        )
    ).approvals

    # The client retries its message: the whole answer is replayed, nothing runs twice.
    asked = len(agents.ollama.requests)
    replayed = await assert_eventually(
        lambda: collect(agents.stub.StreamChat(request, metadata=agents.who))
    )
    assert kinds(replayed)[:3] == ["started", "tool_call", "approval_required"]
    assert kinds(replayed)[-1] == "completed"
    assert "tool_result" in kinds(replayed)
    assert answer_text(replayed) == "Provisioning started."
    assert replayed[0].started == events[0].started
    assert len(agents.ollama.requests) == asked
    assert len(await org_tasks(agents)) == 1


async def test_cancelling_a_plain_tool_round_stops_the_generation(agents: AgentStack) -> None:
    agents.ollama.scenario.script = [Reply(tool_calls=[("list_tasks", {})])]
    agents.ollama.scenario.responder = lambda body: Reply(tokens=[f" t{i}" for i in range(500)])
    agents.ollama.scenario.seconds_per_token = 0.01
    session_id = await new_session(agents)
    call = agents.stub.StreamChat(ask(session_id, "list my tasks"), metadata=agents.who)
    events: list[pb.StreamChatResponse] = []
    await read_until(call, "delta", events)
    call.cancel()

    async def hung_up() -> None:
        assert agents.ollama.requests[-1].hung_up is not None

    await assert_eventually(hung_up)


async def test_bad_tool_calls_become_tool_errors_the_model_sees(agents: AgentStack) -> None:
    agents.ollama.scenario.script = [
        Reply(
            tool_calls=[
                ("provision_workspace", {"workspace": "Team X!"}),
                ("rm_rf", {"path": "/"}),
                ("get_task", {"task_id": str(uuid.uuid4())}),
            ]
        ),
        Reply(tokens=["Sorry."]),
    ]
    session_id = await new_session(agents)
    events = await collect(agents.stub.StreamChat(ask(session_id, "do it"), metadata=agents.who))
    results = [e.tool_result for e in events if e.HasField("tool_result")]
    assert [r.is_error for r in results] == [True, True, True]
    assert "invalid arguments" in results[0].content
    assert "workspace" in results[0].content
    assert "no tool 'rm_rf'" in results[1].content
    assert "not found" in results[2].content
    assert not any(e.HasField("approval_required") for e in events)
    assert events[-1].completed.done_reason == pb.DONE_REASON_STOP
    tool_messages = [m for m in agents.ollama.requests[-1].body["messages"] if m["role"] == "tool"]
    assert len(tool_messages) == 3


async def test_a_task_of_another_org_is_not_found_through_the_agent(agents: AgentStack) -> None:
    foreign = await agents.tasks.stub.PublishWorkspaceTask(
        task_pb2.PublishWorkspaceTaskRequest(
            payload=task_pb2.WorkspaceTaskPayload(
                action=task_pb2.WORKSPACE_ACTION_PROVISION, workspace="secret"
            )
        ),
        metadata=identity("eve", "globex"),
    )
    agents.ollama.scenario.script = [
        Reply(tool_calls=[("get_task", {"task_id": foreign.task.id}), ("list_tasks", {})]),
        Reply(tokens=["Nothing."]),
    ]
    session_id = await new_session(agents)
    events = await collect(
        agents.stub.StreamChat(ask(session_id, "show task"), metadata=agents.who)
    )
    results = [e.tool_result for e in events if e.HasField("tool_result")]
    assert results[0].is_error
    assert "not found" in results[0].content
    assert "secret" not in results[1].content
    assert results[1].content == "No tasks."


async def test_the_tool_budget_ends_with_an_answer_in_words(agents: AgentStack) -> None:
    agents.ollama.scenario.responder = lambda body: (
        Reply(tool_calls=[("list_tasks", {})]) if body.get("tools") else Reply(tokens=["Enough."])
    )
    session_id = await new_session(agents)
    events = await collect(agents.stub.StreamChat(ask(session_id, "loop"), metadata=agents.who))
    assert sum(e.HasField("tool_call") for e in events) == 3  # max_tool_rounds
    last = agents.ollama.requests[-1].body
    assert "tools" not in last or not last["tools"]
    assert "tool budget" in last["messages"][-1]["content"]
    assert answer_text(events) == "Enough."
    usage = events[-1].completed.usage
    assert usage.completion_tokens == 4  # three rounds of one call, then one token


async def test_tool_output_is_bounded_before_the_model_reads_it(agents: AgentStack) -> None:
    for number in range(30):
        await agents.tasks.stub.PublishWorkspaceTask(
            task_pb2.PublishWorkspaceTaskRequest(
                payload=task_pb2.WorkspaceTaskPayload(
                    action=task_pb2.WORKSPACE_ACTION_PROVISION, workspace=f"ws-{number}"
                )
            ),
            metadata=agents.who,
        )
    async with replica(
        replace(agents.settings, agent_limits=AgentLimits(max_tool_output_chars=300))
    ) as stub:
        agents.ollama.scenario.script = [
            Reply(tool_calls=[("list_tasks", {"limit": 30})]),
            Reply(tokens=["Many."]),
        ]
        session_id = await new_session(agents)
        events = await collect(stub.StreamChat(ask(session_id, "tasks?"), metadata=agents.who))
    result = next(e.tool_result for e in events if e.HasField("tool_result"))
    assert len(result.content) < 360
    assert "[cut:" in result.content
    assert agents.ollama.requests[-1].body["messages"][-1]["content"] == result.content


async def test_a_retried_message_is_answered_once_and_replayed(agents: AgentStack) -> None:
    session_id = await new_session(agents)
    request = ask(
        session_id, "hello", agent=pb.AGENT_UNSPECIFIED, client_message_id=str(uuid.uuid4())
    )
    first = await collect(agents.stub.StreamChat(request, metadata=agents.who))
    asked = len(agents.ollama.requests)
    second = await collect(agents.stub.StreamChat(request, metadata=agents.who))
    assert len(agents.ollama.requests) == asked  # the model was not asked twice
    assert answer_text(second) == answer_text(first) == "Hello, world!"
    assert second[0].started == first[0].started
    assert second[-1].completed.assistant_message_id == first[-1].completed.assistant_message_id
    assert [e.sequence for e in second] == list(range(1, len(second) + 1))
    # The same id in another org, or from another user, is another message.
    stranger = identity("someone-else", dict(agents.who)["x-opsmesh-org-id"])
    stranger_session = (
        await agents.sessions.CreateSession(
            session_pb2.CreateSessionRequest(),
            metadata=stranger,
        )
    ).session.id
    third = await collect(
        agents.stub.StreamChat(
            ask(
                stranger_session,
                "hello",
                agent=pb.AGENT_UNSPECIFIED,
                client_message_id=request.client_message_id,
            ),
            metadata=stranger,
        )
    )
    assert third[0].started.generation_id != first[0].started.generation_id


async def test_a_retry_while_the_first_still_runs_is_refused_and_a_failed_one_runs_again(
    agents: AgentStack,
) -> None:
    session_id = await new_session(agents)
    agents.ollama.scenario.seconds_per_token = 0.2
    request = ask(
        session_id, "slow", agent=pb.AGENT_UNSPECIFIED, client_message_id=str(uuid.uuid4())
    )
    call = agents.stub.StreamChat(request, metadata=agents.who)
    events: list[pb.StreamChatResponse] = []
    await read_until(call, "delta", events)
    with pytest.raises(aio.AioRpcError) as caught:
        await collect(agents.stub.StreamChat(request, metadata=agents.who))
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    call.cancel()
    agents.ollama.scenario.seconds_per_token = 0.0

    async def retried() -> list[pb.StreamChatResponse]:
        try:
            return await collect(agents.stub.StreamChat(request, metadata=agents.who))
        except aio.AioRpcError as error:  # the cancelled turn may still be closing
            assert error.code() != grpc.StatusCode.ALREADY_EXISTS
            raise

    again = await assert_eventually(retried)
    assert answer_text(again) == "Hello, world!"
    assert again[0].started.user_message_id == events[0].started.user_message_id

    async def one_question() -> None:
        page = await agents.stub.GetHistory(
            pb.GetHistoryRequest(session_id=session_id), metadata=agents.who
        )
        roles = [m.role for m in page.messages]
        assert roles.count(pb.MESSAGE_ROLE_USER) == 1, roles
        assert roles.count(pb.MESSAGE_ROLE_ASSISTANT) == 2, roles

    await assert_eventually(one_question)
    with pytest.raises(aio.AioRpcError) as caught:
        await collect(
            agents.stub.StreamChat(
                ask(session_id, "x", agent=pb.AGENT_UNSPECIFIED, client_message_id="not-a-uuid"),
                metadata=agents.who,
            )
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_an_agent_without_its_dependencies_is_refused_precisely(agents: AgentStack) -> None:
    bare = replace(agents.settings, task_address="", prometheus_url="", alertmanager_url="")
    async with replica(bare) as stub:
        session_id = await new_session(agents)
        for agent, setting in (
            (pb.AGENT_MONITORING, "OPSMESH_PROMETHEUS_URL"),
            (pb.AGENT_OPERATIONS, "OPSMESH_TASK_ADDR"),
            (pb.AGENT_TROUBLESHOOTING, "OPSMESH_LOGS_SOURCE"),
        ):
            with pytest.raises(aio.AioRpcError) as caught:
                await collect(
                    stub.StreamChat(ask(session_id, "hi", agent=agent), metadata=agents.who)
                )
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert setting in (caught.value.details() or "")
        with pytest.raises(aio.AioRpcError) as caught:
            await collect(stub.StreamChat(ask(session_id, "hi", agent=42), metadata=agents.who))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_parallel_decisions_accept_exactly_one(agents: AgentStack) -> None:
    agents.ollama.scenario.script = [PROVISION, Reply(tokens=["ok"])]
    session_id = await new_session(agents)
    call = agents.stub.StreamChat(ask(session_id, "provision"), metadata=agents.who)
    events: list[pb.StreamChatResponse] = []
    await read_until(call, "approval_required", events)
    decisions = await asyncio.gather(
        *(
            agents.stub.DecideToolCall(
                pb.DecideToolCallRequest(
                    generation_id=events[0].started.generation_id,
                    tool_call_id=events[1].tool_call.tool_call_id,
                    approved=number % 2 == 0,
                ),
                metadata=agents.who,
            )
            for number in range(20)
        )
    )
    assert sum(d.accepted for d in decisions) == 1
    events += [event async for event in call]
    assert sum(e.HasField("tool_result") for e in events) == 1
    assert len(await org_tasks(agents)) <= 1


async def test_which_alerts_are_firing_reads_the_real_prometheus_and_alertmanager(
    agents: AgentStack,
    monitoring: Monitoring,  # noqa: F811 - the fixture
) -> None:
    settings = replace(
        agents.settings,
        prometheus_url=monitoring.prometheus_url,
        alertmanager_url=monitoring.alertmanager_url,
    )
    acme = identity(f"u{uuid.uuid4().hex[:8]}", "acme")
    async with replica(settings) as stub:
        agents.ollama.scenario.script = [
            Reply(
                tool_calls=[
                    ("list_alerts", {}),
                    (
                        "prometheus_query_range",
                        {"query": "opsmesh_demo_queue_depth", "range": "5m"},
                    ),
                ]
            ),
            Reply(tokens=["DemoAcmeBacklog is firing."]),
        ]
        session_id = (
            await agents.sessions.CreateSession(session_pb2.CreateSessionRequest(), metadata=acme)
        ).session.id
        events = await collect(
            stub.StreamChat(
                ask(session_id, "which alerts are firing?", agent=pb.AGENT_MONITORING),
                metadata=acme,
            )
        )
    alerts, series = (e.tool_result for e in events if e.HasField("tool_result"))
    assert not alerts.is_error, alerts.content
    for name in monitoring.acme_alerts:
        assert name in alerts.content
    for name in (*monitoring.globex_alerts, *monitoring.platform_alerts, *monitoring.acme_silenced):
        assert name not in alerts.content
    assert not series.is_error, series.content
    assert series.data["kind"] == "timeseries"
    labels = [dict(item["labels"]) for item in series.data["series"]]
    assert labels
    assert {label.get("org_id") for label in labels} == {"acme"}
    assert not any(e.HasField("approval_required") for e in events)
    offered = {t["function"]["name"] for t in agents.ollama.requests[-2].body["tools"]}
    assert {"list_alerts", "prometheus_query", "prometheus_query_range"} <= offered


async def test_each_agent_gets_the_tools_its_settings_allow(agents: AgentStack) -> None:
    full = replace(
        agents.settings,
        prometheus_url="http://127.0.0.1:9",
        alertmanager_url="http://127.0.0.1:9",
        logs_source="files:///nonexistent",
    )
    dependencies = AgentDependencies.open(full)
    try:
        names = {
            agent.name: {tool.name for tool in agent.tools}
            for agent in dependencies.agents.values()
        }
    finally:
        await dependencies.close()
    assert names["monitoring"] == {
        "prometheus_query",
        "prometheus_query_range",
        "prometheus_series",
        "prometheus_label_values",
        "list_alerts",
        "list_silences",
        "list_alert_rules",
    }
    assert names["operations"] == {
        "provision_workspace",
        "deprovision_workspace",
        "workspace_status",
        "get_task",
        "list_tasks",
    }
    # Troubleshooting correlates logs, the task's record and the metrics around it.
    assert names["troubleshooting"] == {
        "search_logs",
        "log_patterns",
        "explain_task_failure",
        "prometheus_query",
        "prometheus_query_range",
    }
    state_changing = {
        tool.name
        for agent in dependencies.agents.values()
        for tool in agent.tools
        if tool.changes_state
    }
    assert state_changing == {"provision_workspace", "deprovision_workspace"}


def test_describe_task_reads_the_typed_payload() -> None:
    typed = task_pb2.Task(
        id="t1",
        type=task_pb2.TASK_TYPE_WORKSPACE,
        workspace=task_pb2.WorkspaceTaskPayload(
            action=task_pb2.WORKSPACE_ACTION_PROVISION,
            workspace="team-q",
            quota=task_pb2.WorkspaceQuota(cpu="2", pods=3),
            notify_emails=["ops@example.com"],
        ),
    )
    payload = describe_task(typed)["payload"]
    assert payload == {
        "action": "WORKSPACE_ACTION_PROVISION",
        "workspace": "team-q",
        "quota": {"cpu": "2", "pods": 3},
        "notify_emails": ["ops@example.com"],
    }
    assert type(payload["quota"]["pods"]) is int
    email = task_pb2.Task(type=task_pb2.TASK_TYPE_EMAIL, email={"notification_id": "n-1"})
    assert describe_task(email)["payload"] == {"notification_id": "n-1"}
    # The deprecated Struct alone is no longer read.
    struct_only = task_pb2.Task(type=task_pb2.TASK_TYPE_WORKSPACE)
    struct_only.payload.update({"workspace": "old"})
    assert describe_task(struct_only)["payload"] == {}


async def test_operations_tools_read_the_typed_payload_from_the_task_service(
    agents: AgentStack,
) -> None:
    published = await agents.tasks.stub.PublishWorkspaceTask(
        task_pb2.PublishWorkspaceTaskRequest(
            payload=task_pb2.WorkspaceTaskPayload(
                action=task_pb2.WORKSPACE_ACTION_PROVISION,
                workspace="team-q",
                quota=task_pb2.WorkspaceQuota(pods=3),
            )
        ),
        metadata=agents.who,
    )
    agents.ollama.scenario.script = [
        Reply(
            tool_calls=[
                ("workspace_status", {"workspace": "team-q"}),
                ("get_task", {"task_id": published.task.id}),
            ]
        ),
        Reply(tokens=["Pending."]),
    ]
    session_id = await new_session(agents)
    events = await collect(agents.stub.StreamChat(ask(session_id, "team-q?"), metadata=agents.who))
    status, task = [e.tool_result for e in events if e.HasField("tool_result")]
    assert not status.is_error, status.content
    assert status.content.startswith("Workspace team-q: provision is pending."), status.content
    assert "(workspace team-q, workspace_action_provision)" in task.content
    payload = task.data["task"]["payload"]
    assert payload["workspace"] == "team-q"
    assert payload["quota"]["pods"] == 3
