"""The agents' evaluation set, scripted (always) and against a real model (when one is reachable).

The environment is real: Prometheus and Alertmanager with two organizations' metrics and
firing alerts, the task service with a task that failed and a workspace task, and log
files in the dev stack's JSON format with lines of two organizations. The evaluated user
belongs to ``acme`` without roles, so every answer must stay inside acme.

``make eval MODEL=llama3.2:3b`` (with ``OLLAMA_HOST`` pointing at an Ollama that has the
model) runs the model evaluation; it is skipped with a clear message when none is reachable.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import pytest
from grpc import aio

from chat_svc.agents.catalog import AgentLimits
from chat_svc.server import build_runner
from devtools.servers import NatsServer, RedisServer
from mesh.context import Principal, principal_var, request_id_var
from mesh.logs import JsonFormatter
from mesh.server import ServiceRunner
from opsmesh.chat.v1 import chat_pb2_grpc
from opsmesh.session.v1 import session_pb2, session_pb2_grpc
from opsmesh.task.v1 import task_pb2
from tests.conftest import FAST_HEALTH
from tests.evals.harness import Outcome, ask, load_questions, report, save, scripted_model
from tests.helpers import assert_eventually, identity
from tests.monitoring_fixtures import Monitoring, monitoring  # noqa: F401 - a fixture
from tests.ollama_standin import OllamaStandIn
from tests.taskkit import Script, ScriptedHandler, TaskStack, running_worker, task_stack
from tests.test_chat import chat_settings

ACME = identity("evaluator", "acme")
RESULTS = Path("build/evals")


@dataclass
class Environment:
    chat: chat_pb2_grpc.ChatServiceStub
    sessions: session_pb2_grpc.SessionServiceStub
    ollama: OllamaStandIn
    facts: dict[str, str]
    settings: object


def write_logs(directory: Path, failed_task_id: str, facts: dict[str, str]) -> None:
    """Log lines as the services write them (mesh.logs.JsonFormatter), two orgs mixed."""
    lines = [
        ("task_worker", logging.ERROR, "acme", {"task_id": failed_task_id}, facts["task_log_line"]),
        ("notify_svc", logging.WARNING, "acme", {}, facts["warning_line"]),
        ("chat_svc", logging.INFO, "acme", {}, facts["request_line"]),
        ("chat_svc", logging.ERROR, "acme", {}, facts["error_line"]),
        ("chat_svc", logging.ERROR, "globex", {}, facts["foreign_line"]),
        ("session_svc", logging.INFO, "acme", {}, f"session opened; {facts['search_text']} noted"),
    ]
    lines += [
        ("task_worker", logging.ERROR, "acme", {}, f"connection to 10.0.0.{n} refused")
        for n in range(int(facts["pattern_count"]))
    ]
    for service, level, org, extra, message in lines:
        formatter = JsonFormatter(service=service)
        token = principal_var.set(Principal(user_id="someone", org_id=org))
        request = request_id_var.set(
            facts["request_id"] if message == facts["request_line"] else None
        )
        try:
            record = logging.LogRecord("opsmesh.eval", level, __file__, 1, message, None, None)
            record.__dict__.update(extra)
            with (directory / f"{service}.log").open("a") as out:
                out.write(formatter.format(record) + "\n")
        finally:
            principal_var.reset(token)
            request_id_var.reset(request)


async def failed_task(tasks: TaskStack) -> task_pb2.Task:
    notification = str(uuid.uuid4())
    handler = ScriptedHandler(scripts={notification: Script(permanent=True)})
    published = await tasks.stub.PublishEmailTask(
        task_pb2.PublishEmailTaskRequest(
            payload=task_pb2.EmailTaskPayload(notification_id=notification)
        ),
        metadata=ACME,
    )

    async def failed() -> task_pb2.Task:
        reply = await tasks.stub.GetTask(
            task_pb2.GetTaskRequest(task_id=published.task.id), metadata=ACME
        )
        assert reply.task.status == task_pb2.TASK_STATUS_FAILED
        return reply.task

    async with running_worker(tasks, handler):
        return await assert_eventually(failed)


@pytest.fixture
async def environment(
    session_runner: ServiceRunner,
    redis_server: RedisServer,
    nats_server: NatsServer,
    history_dsn: str,
    monitoring: Monitoring,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> AsyncIterator[Environment]:
    ollama = await OllamaStandIn().start()
    async with task_stack(nats_server.url) as tasks:
        task = await failed_task(tasks)
        workspace = "web-prod"
        await tasks.stub.PublishWorkspaceTask(
            task_pb2.PublishWorkspaceTaskRequest(
                payload=task_pb2.WorkspaceTaskPayload(
                    action=task_pb2.WORKSPACE_ACTION_PROVISION, workspace=workspace
                )
            ),
            metadata=ACME,
        )
        facts = {
            "acme_alert": monitoring.acme_alerts[0],
            "acme_silenced": monitoring.acme_silenced[0],
            "globex_alert": monitoring.globex_alerts[0],
            "acme_silence_id": monitoring.acme_silence_id,
            "globex_silence_id": monitoring.globex_silence_id,
            "acme_queue_depth": str(monitoring.queue_depth["acme"]),
            "globex_queue_depth": str(monitoring.queue_depth["globex"]),
            "acme_inactive_rule": "DemoAcmeNever",
            "failed_task_id": task.id,
            "failed_task_error": task.error,
            "unknown_task_id": str(uuid.uuid4()),
            "workspace": workspace,
            "task_log_line": "smtp relay answered 550 5.1.1 mailbox unavailable",
            "warning_line": "template rendered without a plain-text part",
            "request_line": "history page served in 812 ms",
            "request_id": uuid.uuid4().hex[:16],
            "error_line": "ClickHouse insert failed: too many parts",
            "foreign_line": "globex secret payroll export crashed",
            "noisy_service": "notify_svc",
            "search_text": "quarterly-rollover",
            "pattern_count": "30",
        }
        logs = tmp_path / "logs"
        logs.mkdir()
        write_logs(logs, task.id, facts)
        settings = replace(
            chat_settings(session_runner, redis_server.url, history_dsn, ollama.url),
            task_address=f"127.0.0.1:{tasks.runner.port}",
            prometheus_url=monitoring.prometheus_url,
            alertmanager_url=monitoring.alertmanager_url,
            logs_source=f"files://{logs}",
            agent_limits=AgentLimits(approval_timeout=30.0, tool_timeout=10.0),
        )
        runner = await build_runner(settings, options=FAST_HEALTH)
        await runner.start()
        try:
            async with (
                aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel,
                aio.insecure_channel(f"127.0.0.1:{session_runner.port}") as session_channel,
            ):
                yield Environment(
                    chat_pb2_grpc.ChatServiceStub(channel),
                    session_pb2_grpc.SessionServiceStub(session_channel),
                    ollama,
                    facts,
                    settings,
                )
        finally:
            await runner.stop()
            await ollama.stop()


async def new_session(environment: Environment) -> tuple[str, tuple[tuple[str, str], ...]]:
    """A session of a fresh member of acme (a session per question keeps the prompts apart)."""
    who = identity(f"evaluator-{uuid.uuid4().hex[:8]}", "acme")
    reply = await environment.sessions.CreateSession(
        session_pb2.CreateSessionRequest(), metadata=who
    )
    return reply.session.id, who


async def test_scripted_evaluation_passes_every_question(environment: Environment) -> None:
    questions = load_questions(environment.facts)
    assert len(questions) >= 24
    assert {q.agent for q in questions} == {"monitoring", "operations", "troubleshooting"}
    outcomes: list[Outcome] = []
    for question in questions:
        environment.ollama.scenario.responder = scripted_model(question)
        session_id, who = await new_session(environment)
        outcomes.append(await ask(environment.chat, who, session_id, question))
    printed = report(outcomes, title="scripted tool calls, real tools")
    print(printed)
    save(outcomes, RESULTS / "scripted.json")
    assert all(o.passed for o in outcomes), printed


async def test_a_scripted_answer_without_the_facts_fails(environment: Environment) -> None:
    """The grader is not a rubber stamp: calling the wrong tool loses the facts."""
    (question,) = [q for q in load_questions(environment.facts) if q.id == "mon-firing"]
    wrong = replace(question, script=((("list_silences", {}),),))
    environment.ollama.scenario.responder = scripted_model(wrong)
    session_id, who = await new_session(environment)
    outcome = await ask(environment.chat, who, session_id, question)
    assert not outcome.passed
    assert outcome.missing_tools == ["list_alerts"]
    assert outcome.missing_facts == [environment.facts["acme_alert"]]


def _reachable_model() -> tuple[str, str] | None:
    model = os.environ.get("OPSMESH_EVAL_MODEL", "")
    host = os.environ.get("OPSMESH_EVAL_OLLAMA_HOST") or os.environ.get("OLLAMA_HOST", "")
    if not model or not host:
        return None
    host = host if "://" in host else f"http://{host}"
    try:
        tags = httpx.get(f"{host}/api/tags", timeout=3).json()
    except (httpx.HTTPError, ValueError):
        return None
    names = {m.get("model") or m.get("name") for m in tags.get("models", [])}
    return (host, model) if model in names else None


@pytest.mark.skipif(
    _reachable_model() is None,
    reason="no model to evaluate: run `make eval MODEL=<name>` with OLLAMA_HOST pointing at an "
    "Ollama server that has that model",
)
async def test_model_evaluation(environment: Environment) -> None:
    found = _reachable_model()
    assert found is not None
    host, model = found
    runner = await build_runner(
        replace(
            environment.settings,  # type: ignore[type-var]
            model=replace(
                environment.settings.model,  # type: ignore[attr-defined]
                host=host,
                allowed=(model,),
                chosen_default=model,
                first_token_timeout=600.0,
                idle_timeout=120.0,
            ),
        ),
        options=FAST_HEALTH,
    )
    await runner.start()
    outcomes: list[Outcome] = []
    try:
        async with aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            for question in load_questions(environment.facts):
                session_id, who = await new_session(environment)
                outcomes.append(await ask(stub, who, session_id, question, model=model))
    finally:
        await runner.stop()
    printed = report(outcomes, title=f"model {model}")
    print(printed)
    save(outcomes, RESULTS / f"model-{model.replace(':', '_').replace('/', '_')}.json")
    # A model's pass rate is a measurement, not a gate; leaking another org's data is a defect.
    assert not [o.question.id for o in outcomes if o.leaked]
