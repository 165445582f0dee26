"""One answer of the model: its rounds of tool calls, its events, and what it cost.

A :class:`Generation` runs as its own task and writes typed events into a
:class:`Feed`; the RPC handler relays them to the client. Text deltas are
coalesced while the client reads slower than the model writes, so the feed stays
small however far behind the client is. With an agent, each model turn may call
tools: calls are validated against the tool's schema, state-changing ones wait
for an approval, every result (or failure) goes back to the model as a ``tool``
message, and after the agent's last tool round the model must answer in words.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import duration_pb2, struct_pb2

from chat_svc.agents.catalog import Agent
from chat_svc.agents.tools import Tool, ToolContext, ToolFailure, ToolOutput
from chat_svc.approvals import Approvals, Decision, PendingApproval
from chat_svc.model import ModelServer
from chat_svc.parts import Part, ToolCallPart
from mesh.context import Principal
from mesh.errors import OpsmeshError
from mesh.protos import timestamp_from_millis
from opsmesh.chat.v1 import chat_pb2

log = logging.getLogger("opsmesh.chat")

# A coalesced delta stays far below gRPC's message size limit, however far behind the client is.
_MAX_DELTA_CHARS = 256 * 1024
_DONE = {"stop": chat_pb2.DONE_REASON_STOP, "length": chat_pb2.DONE_REASON_LENGTH}
_LAST_ROUND = (
    "The tool budget of this answer is spent: answer now from the results above, and say what "
    "is still unknown."
)


def duration(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


def _struct(data: Any) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(_json_safe(data))
    return struct


def _json_safe(value: Any) -> Any:
    """Plain JSON values (no NaN/inf, which neither JSON nor ClickHouse's JSON type carry)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


class Feed:
    """Events waiting for the client, with consecutive text deltas merged into one."""

    def __init__(self) -> None:
        self._events: collections.deque[dict[str, Any]] = collections.deque()
        self._text: list[str] = []
        self._thinking: list[str] = []
        self._tokens = 0
        self._size = 0
        self.ready = asyncio.Event()

    def delta(self, content: str, thinking: str) -> None:
        self._text.append(content)
        self._thinking.append(thinking)
        self._tokens += 1
        self._size += len(content) + len(thinking)
        if self._size >= _MAX_DELTA_CHARS:
            self._close_delta()
        self.ready.set()

    def event(self, **kind: Any) -> None:
        self._close_delta()
        self._events.append(kind)
        self.ready.set()

    def _close_delta(self) -> None:
        if self._tokens:
            self._events.append(
                {
                    "delta": chat_pb2.TokenDelta(
                        content="".join(self._text),
                        thinking="".join(self._thinking),
                        token_count=self._tokens,
                    )
                }
            )
            self._text, self._thinking, self._tokens, self._size = [], [], 0, 0

    def take(self) -> dict[str, Any] | None:
        if not self._events:
            self._close_delta()
        if not self._events:
            self.ready.clear()
            return None
        return self._events.popleft()


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    eval_seconds: float = 0.0
    total_seconds: float = 0.0
    load_seconds: float = 0.0

    def add(self, final: Part) -> None:
        self.prompt_tokens += final.prompt_eval_count or 0
        self.completion_tokens += final.eval_count or 0
        self.eval_seconds += (final.eval_duration or 0) / 1e9
        self.total_seconds += (final.total_duration or 0) / 1e9
        self.load_seconds += (final.load_duration or 0) / 1e9


@dataclass(kw_only=True)
class Generation:
    generation_id: str
    session_id: str
    principal: Principal
    model: str
    options: dict[str, Any]
    messages: list[dict[str, Any]]
    agent: Agent | None
    tool_context: ToolContext
    models: ModelServer
    approvals: Approvals
    user_message_id: str
    assistant_message_id: str
    client_message_id: str = ""
    accepted: float = field(default_factory=time.perf_counter)
    feed: Feed = field(default_factory=Feed)
    text: list[str] = field(default_factory=list)
    thinking: list[str] = field(default_factory=list)
    tools_log: list[dict[str, Any]] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    final: Part | None = None
    """The model server's last ``done`` line of the last round; None while (or if never) done."""
    first_token_at: float | None = None
    awaiting_approval: int = 0

    def started(self) -> chat_pb2.Started:
        return chat_pb2.Started(
            generation_id=self.generation_id,
            model=self.model,
            user_message_id=self.user_message_id,
            assistant_message_id=self.assistant_message_id,
            session_id=self.session_id,
        )

    async def run(self) -> None:
        rounds = self.agent.limits.max_tool_rounds if self.agent and self.agent.tools else 0
        for round_number in range(rounds + 1):
            last = round_number == rounds
            if last and round_number:
                self.messages.append({"role": "system", "content": _LAST_ROUND})
            calls, said = await self._model_turn(offer_tools=not last)
            if not calls:
                return
            self.messages.append(
                {
                    "role": "assistant",
                    "content": said,
                    "tool_calls": [
                        {"function": {"name": c.name, "arguments": dict(c.arguments)}}
                        for c in calls
                    ],
                }
            )
            for call in calls:
                name, result = await self._call(call.name, call.arguments)
                self.messages.append({"role": "tool", "content": result, "tool_name": name})

    async def _model_turn(self, *, offer_tools: bool) -> tuple[list[ToolCallPart], str]:
        self.final = None
        tools = self.agent.schemas if (offer_tools and self.agent is not None) else None
        calls: list[ToolCallPart] = []
        said: list[str] = []
        async for part in self.models.stream(
            model=self.model, messages=self.messages, options=self.options, tools=tools
        ):
            content, thinking = part.content, part.thinking
            if content or thinking:
                if self.first_token_at is None:
                    self.first_token_at = time.perf_counter()
                self.feed.delta(content, thinking)
                self.text.append(content)
                self.thinking.append(thinking)
                said.append(content)
            if part.tool_calls and tools is not None:
                calls.extend(part.tool_calls)
            if part.done:
                self.final = part
                self.usage.add(part)
        return calls, "".join(said)

    async def _call(self, name: str, raw: Any) -> tuple[str, str]:
        """Runs one tool call the model made; returns (tool name, result text for the model)."""
        assert self.agent is not None
        call_id = f"call_{uuid.uuid4().hex[:16]}"
        arguments = _json_safe(dict(raw or {}))
        tool = self.agent.tool(name)
        record: dict[str, Any] = {
            "tool_call_id": call_id,
            "name": name,
            "arguments": arguments,
            "requires_approval": bool(tool and tool.changes_state),
        }
        self.tools_log.append(record)
        self.feed.event(
            tool_call=chat_pb2.ToolCall(
                tool_call_id=call_id,
                name=name,
                arguments=_struct(arguments),
                requires_approval=record["requires_approval"],
            )
        )
        started = time.perf_counter()
        ran = 0.0
        try:
            if tool is None:
                known = ", ".join(t.name for t in self.agent.tools)
                raise ToolFailure(f"there is no tool {name[:80]!r}; the tools are: {known}")
            parsed = tool.parse(arguments)
            if tool.changes_state:
                decision = await self._approval(tool, parsed, call_id, record)
                if decision.state != "approved":
                    raise ToolFailure(_refusal(decision))
            started = time.perf_counter()
            output = await self._run(tool, parsed, call_id)
            ran = time.perf_counter() - started
            text, is_error, data = output.text, False, output.data
        except ToolFailure as failure:
            text, is_error, data = failure.message, True, None
        limit = self.agent.limits.max_tool_output_chars
        if len(text) > limit:
            text = f"{text[:limit]}\n[cut: {len(text) - limit} more characters]"
        safe_data = _json_safe(dict(data)) if data else None
        record["result"] = {
            "content": text,
            "is_error": is_error,
            "duration_ms": round(ran * 1000, 1),
            **({"data": safe_data} if safe_data else {}),
        }
        result = chat_pb2.ToolResult(
            tool_call_id=call_id, name=name, content=text, is_error=is_error, duration=duration(ran)
        )
        if safe_data:
            result.data.update(safe_data)
        self.feed.event(tool_result=result)
        return name, text

    async def _run(self, tool: Tool[Any], arguments: Any, call_id: str) -> ToolOutput:
        assert self.agent is not None
        context = ToolContext(
            principal=self.tool_context.principal,
            metadata=self.tool_context.metadata,
            idempotency_key=f"chat:{self.generation_id}:{call_id}",
        )
        try:
            return await asyncio.wait_for(
                tool.run(arguments, context), self.agent.limits.tool_timeout
            )
        except TimeoutError:
            raise ToolFailure(
                f"{tool.name} did not finish within {self.agent.limits.tool_timeout:g}s"
            ) from None
        except ToolFailure:
            raise
        except OpsmeshError as error:
            raise ToolFailure(f"{tool.name} failed: {error.message}") from None
        except Exception as error:
            log.exception("tool %s failed", tool.name, extra={"tool": tool.name})
            raise ToolFailure(f"{tool.name} failed unexpectedly ({type(error).__name__})") from None

    async def _approval(
        self, tool: Tool[Any], arguments: Any, call_id: str, record: dict[str, Any]
    ) -> Decision:
        assert self.agent is not None
        deadline_ms = int((time.time() + self.agent.limits.approval_timeout) * 1000)
        description = tool.explain(arguments)
        record["approval"] = {"description": description, "decision": "pending", "reason": ""}
        deadline = timestamp_from_millis(deadline_ms)
        self.feed.event(
            approval_required=chat_pb2.ApprovalRequired(
                tool_call_id=call_id,
                name=tool.name,
                arguments=_struct(record["arguments"]),
                description=description,
                deadline=deadline,
            )
        )
        pending = PendingApproval(
            generation_id=self.generation_id,
            tool_call_id=call_id,
            session_id=self.session_id,
            name=tool.name,
            arguments=record["arguments"],
            description=description,
            deadline_ms=deadline_ms,
        )
        self.awaiting_approval += 1
        try:
            decision = await self.approvals.wait(self.principal, pending)
        except OpsmeshError as error:
            decision = Decision("expired", f"the approval could not be recorded ({error.message})")
        finally:
            self.awaiting_approval -= 1
        record["approval"].update(decision=decision.state, reason=decision.reason)
        return decision

    def completed(self, done_reason: int) -> chat_pb2.Completed:
        usage = chat_pb2.Usage(
            prompt_tokens=self.usage.prompt_tokens,
            completion_tokens=self.usage.completion_tokens,
        )
        if self.usage.eval_seconds:
            usage.tokens_per_second = self.usage.completion_tokens / self.usage.eval_seconds
        usage.total_duration.CopyFrom(duration(self.usage.total_seconds))
        usage.load_duration.CopyFrom(duration(self.usage.load_seconds))
        if self.first_token_at is not None:
            usage.time_to_first_token.CopyFrom(duration(self.first_token_at - self.accepted))
        final = self.final
        return chat_pb2.Completed(
            done_reason=done_reason,  # type: ignore[arg-type]
            raw_done_reason=(final.done_reason or "") if final is not None else "cancelled",
            usage=usage,
            assistant_message_id=self.assistant_message_id,
            incomplete=final is None,
        )

    def done_reason(self) -> int:
        reason = (self.final.done_reason if self.final is not None else "") or "stop"
        return _DONE.get(reason, chat_pb2.DONE_REASON_STOP)

    def metadata(self, failure: BaseException | None, stopped: bool) -> dict[str, Any]:
        """What the history keeps of this answer besides its text."""
        metadata: dict[str, Any] = {"model": self.model}
        if self.agent is not None:
            metadata["agent"] = self.agent.name
        if self.tools_log:
            metadata["tools"] = self.tools_log
        if self.final is not None:
            metadata.update(
                done_reason=self.final.done_reason or "stop",
                prompt_tokens=self.usage.prompt_tokens,
                completion_tokens=self.usage.completion_tokens,
            )
        elif isinstance(failure, OpsmeshError):
            metadata["error"] = failure.message
        elif stopped:
            metadata["error"] = "stopped by the user"
        elif failure is not None:
            metadata["error"] = "cancelled by the client"
        thinking = "".join(self.thinking)
        if thinking:
            metadata["thinking"] = thinking
        return metadata


def _refusal(decision: Decision) -> str:
    if decision.state == "rejected":
        reason = f": {decision.reason}" if decision.reason else ""
        return f"The user rejected this call{reason}. It did not run."
    why = f" ({decision.reason})" if decision.reason else ""
    return f"No decision was made before the approval deadline{why}. The call did not run."
