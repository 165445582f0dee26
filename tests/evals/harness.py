"""The agents' evaluation: questions, a scripted model, grading and the pass-rate report.

One harness serves two runs. The scripted run (in ``make test``) replays, through
the Ollama stand-in, the tool calls a good model makes for each question and then
answers with what the tools returned: it passes only when the real tools against
the real Prometheus, Alertmanager, task service and logs find the facts. The
model run (``make eval MODEL=...``) sends the same questions to a real model,
which picks its own tools; the report shows how often it gets there.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from grpc import aio

from opsmesh.chat.v1 import chat_pb2 as pb
from opsmesh.chat.v1 import chat_pb2_grpc
from tests.ollama_standin import Reply

QUESTIONS = Path(__file__).with_name("questions.yaml")
AGENTS = {
    "monitoring": pb.AGENT_MONITORING,
    "operations": pb.AGENT_OPERATIONS,
    "troubleshooting": pb.AGENT_TROUBLESHOOTING,
}
_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


@dataclass(frozen=True, kw_only=True)
class Question:
    id: str
    agent: str
    question: str
    expect_tools: tuple[str, ...]
    facts: tuple[str, ...]
    forbidden: tuple[str, ...] = ()
    decide: str = "approve"
    script: tuple[tuple[tuple[str, dict[str, Any]], ...], ...] = ()


def _fill(value: Any, facts: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        return _PLACEHOLDER.sub(lambda m: str(facts[m.group(1)]), value)
    if isinstance(value, list | tuple):
        return [_fill(item, facts) for item in value]
    if isinstance(value, dict):
        return {key: _fill(item, facts) for key, item in value.items()}
    return value


def load_questions(facts: Mapping[str, str], path: Path = QUESTIONS) -> list[Question]:
    """The questions with the environment's facts filled in."""
    questions = []
    for raw in yaml.safe_load(path.read_text()):
        filled = _fill(raw, facts)
        questions.append(
            Question(
                id=filled["id"],
                agent=filled["agent"],
                question=filled["question"],
                expect_tools=tuple(filled.get("expect_tools", ())),
                facts=tuple(filled.get("facts", ())),
                forbidden=tuple(filled.get("forbidden", ())),
                decide=filled.get("decide", "approve"),
                script=tuple(
                    tuple((name, dict(arguments)) for name, arguments in round_)
                    for round_ in filled.get("script", ())
                ),
            )
        )
    return questions


def scripted_model(question: Question) -> Any:
    """A stand-in model for one question: its scripted tool rounds, then the tools' findings."""
    rounds = list(question.script)

    def respond(body: dict[str, Any]) -> Reply:
        if rounds and body.get("tools"):
            return Reply(tool_calls=list(rounds.pop(0)))
        findings = [m["content"] for m in body["messages"] if m["role"] == "tool"]
        return Reply(tokens=["What the tools found:\n", *(f"{f}\n" for f in findings)])

    return respond


@dataclass
class Outcome:
    question: Question
    called: list[str] = field(default_factory=list)
    answer: str = ""
    error: str = ""

    @property
    def missing_tools(self) -> list[str]:
        return [name for name in self.question.expect_tools if name not in self.called]

    @property
    def missing_facts(self) -> list[str]:
        answer = self.answer.lower()
        return [fact for fact in self.question.facts if fact.lower() not in answer]

    @property
    def leaked(self) -> list[str]:
        answer = self.answer.lower()
        return [fact for fact in self.question.forbidden if fact.lower() in answer]

    @property
    def passed(self) -> bool:
        return not (self.error or self.missing_tools or self.missing_facts or self.leaked)

    def why(self) -> str:
        if self.passed:
            return "ok"
        parts = [self.error] if self.error else []
        if self.missing_tools:
            parts.append(f"tools not called: {', '.join(self.missing_tools)}")
        if self.missing_facts:
            parts.append(f"facts missing: {', '.join(self.missing_facts)}")
        if self.leaked:
            parts.append(f"leaked: {', '.join(self.leaked)}")
        return "; ".join(parts)


async def ask(
    stub: chat_pb2_grpc.ChatServiceStub,
    metadata: tuple[tuple[str, str], ...],
    session_id: str,
    question: Question,
    *,
    model: str = "",
) -> Outcome:
    """Asks one question, answering approval requests as the question says."""
    outcome = Outcome(question)
    request = pb.StreamChatRequest(
        session_id=session_id,
        message=question.question,
        agent=AGENTS[question.agent],  # type: ignore[arg-type]
        model=model,
    )
    generation_id = ""
    try:
        async for event in stub.StreamChat(request, metadata=metadata):
            kind = event.WhichOneof("event")
            if kind == "started":
                generation_id = event.started.generation_id
            elif kind == "tool_call":
                outcome.called.append(event.tool_call.name)
            elif kind == "approval_required":
                await stub.DecideToolCall(
                    pb.DecideToolCallRequest(
                        generation_id=generation_id,
                        tool_call_id=event.approval_required.tool_call_id,
                        approved=question.decide == "approve",
                        reason="" if question.decide == "approve" else "not now (evaluation)",
                    ),
                    metadata=metadata,
                )
            elif kind == "delta":
                outcome.answer += event.delta.content
    except aio.AioRpcError as error:
        outcome.error = f"{error.code().name}: {error.details()}"
    return outcome


def report(outcomes: list[Outcome], *, title: str) -> str:
    """Pass rate per agent and per question, as printed by ``make eval`` and the tests."""
    lines = [f"agent evaluation: {title}"]
    by_agent: dict[str, list[Outcome]] = defaultdict(list)
    for outcome in outcomes:
        by_agent[outcome.question.agent].append(outcome)
        mark = "PASS" if outcome.passed else "FAIL"
        lines.append(f"  {mark} {outcome.question.id:<26} {outcome.why()}")
    for agent, results in sorted(by_agent.items()):
        passed = sum(o.passed for o in results)
        lines.append(f"  {agent:<16} {passed}/{len(results)} ({100 * passed / len(results):.0f}%)")
    passed = sum(o.passed for o in outcomes)
    lines.append(f"  {'all':<16} {passed}/{len(outcomes)} ({100 * passed / len(outcomes):.0f}%)")
    return "\n".join(lines)


def save(outcomes: list[Outcome], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            [
                {
                    "id": o.question.id,
                    "agent": o.question.agent,
                    "passed": o.passed,
                    "why": o.why(),
                    "called": o.called,
                    "answer": o.answer,
                }
                for o in outcomes
            ],
            indent=2,
        )
    )
