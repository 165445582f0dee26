"""The lines of Ollama's /api/chat NDJSON stream, read into small typed parts.

One part per token is on the hot path: a slotted dataclass made from the parsed
line costs a fraction of validating it into the client library's pydantic model,
and only the final line carries the counters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class ToolCallPart:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Part:
    content: str = ""
    thinking: str = ""
    tool_calls: tuple[ToolCallPart, ...] = ()
    done: bool = False
    done_reason: str = ""
    prompt_eval_count: int = 0
    eval_count: int = 0
    eval_duration: int = 0
    """Nanoseconds, as Ollama reports them (also the three below)."""
    total_duration: int = 0
    load_duration: int = 0


class LineError(Exception):
    """A line the model server sent is not a chat part: ``error`` (Ollama's own, sent with
    HTTP 200 mid-stream) or malformed."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def parse_line(line: bytes) -> Part | None:
    """The part a line carries; None for a blank line."""
    if not line.strip():
        return None
    try:
        data = json.loads(line)
    except ValueError as error:
        raise LineError(f"the model server sent a malformed line ({error})") from None
    if not isinstance(data, dict):
        raise LineError("the model server sent a line that is not a JSON object")
    if "error" in data:
        raise LineError(str(data["error"]))
    message = data.get("message")
    message = message if isinstance(message, dict) else {}
    calls = message.get("tool_calls")
    part = Part(
        content=_text(message.get("content")),
        thinking=_text(message.get("thinking")),
        tool_calls=_tool_calls(calls) if calls else (),
    )
    if not data.get("done"):
        return part
    return Part(
        content=part.content,
        thinking=part.thinking,
        tool_calls=part.tool_calls,
        done=True,
        done_reason=_text(data.get("done_reason")),
        prompt_eval_count=_count(data.get("prompt_eval_count")),
        eval_count=_count(data.get("eval_count")),
        eval_duration=_count(data.get("eval_duration")),
        total_duration=_count(data.get("total_duration")),
        load_duration=_count(data.get("load_duration")),
    )


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _tool_calls(raw: Any) -> tuple[ToolCallPart, ...]:
    if not isinstance(raw, list):
        return ()
    calls = []
    for call in raw:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            continue
        arguments = function.get("arguments")
        if isinstance(arguments, str):  # some models send the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except ValueError:
                arguments = None
        calls.append(
            ToolCallPart(
                name=_text(function.get("name")),
                arguments=arguments if isinstance(arguments, dict) else {},
            )
        )
    return tuple(calls)
