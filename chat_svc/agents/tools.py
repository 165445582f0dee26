"""Tools the model may call: typed definitions, their JSON schemas, validated arguments.

A tool is an async function ``(arguments, context) -> ToolOutput`` whose first
parameter is a pydantic model: its fields (types, constraints, descriptions)
become the schema sent to Ollama's ``tools`` field, and the model's arguments are
validated against the same model before the tool runs. The function's docstring
is the tool's description. Nothing here is hand-written JSON.

A tool that cannot do what was asked raises :class:`ToolFailure`; the message is
what the model reads as the result (a failed tool is an answer, never a broken
stream). Tools act for :attr:`ToolContext.principal`, never for whoever the
model's arguments name.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, get_type_hints

from pydantic import BaseModel, ValidationError

from mesh.context import PLATFORM_ROLES, Principal

ArgsT = TypeVar("ArgsT", bound=BaseModel)


def visible_org(principal: Principal) -> str | None:
    """The organization whose data ``principal`` may read through a tool; None: all of them."""
    return None if principal.roles & PLATFORM_ROLES else principal.org_id


class ToolFailure(Exception):
    """The tool could not do what was asked; ``message`` is the result the model reads."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True, kw_only=True)
class ToolContext:
    """Who a tool acts for, and the credentials to call other services on their behalf."""

    principal: Principal
    metadata: tuple[tuple[str, str], ...] = ()
    """Call metadata carrying the caller's identity (their bearer token or identity headers)."""
    idempotency_key: str = ""
    """Stable for one tool call of one generation: a retried effect is not done twice."""


@dataclass(frozen=True, kw_only=True)
class ToolOutput:
    """A tool's result: text for the model, and optionally structured data for clients."""

    text: str
    data: Mapping[str, Any] | None = None
    """E.g. ``{"kind": "timeseries", ...}`` for a chart; never sent to the model."""


ToolFunction = Callable[[ArgsT, ToolContext], Awaitable[ToolOutput]]


@dataclass(frozen=True, kw_only=True)
class Tool(Generic[ArgsT]):
    name: str
    description: str
    arguments: type[ArgsT]
    function: ToolFunction[ArgsT]
    changes_state: bool = False
    """True when running it changes anything: it then waits for the user's approval."""
    describe: Callable[[ArgsT], str] | None = field(default=None, repr=False)
    """What a state-changing call would do, in words, for the approval request."""

    def schema(self) -> dict[str, Any]:
        """The tool in Ollama's ``tools`` format (a JSON schema of the arguments)."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": _plain_schema(self.arguments.model_json_schema()),
            },
        }

    def parse(self, raw: Mapping[str, Any] | None) -> ArgsT:
        """The model's arguments validated, or ToolFailure saying what is wrong with them."""
        try:
            return self.arguments.model_validate(dict(raw or {}))
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in issue['loc']) or 'arguments'}: {issue['msg']}"
                for issue in error.errors(include_url=False)
            )
            raise ToolFailure(f"invalid arguments for {self.name}: {problems}") from None

    def explain(self, arguments: ArgsT) -> str:
        if self.describe is not None:
            return self.describe(arguments)
        shown = ", ".join(f"{k}={v!r}" for k, v in arguments.model_dump(exclude_none=True).items())
        return f"{self.name}({shown})"

    async def run(self, arguments: ArgsT, context: ToolContext) -> ToolOutput:
        return await self.function(arguments, context)


def tool(
    *, changes_state: bool = False, describe: Callable[[Any], str] | None = None
) -> Callable[[ToolFunction[Any]], Tool[Any]]:
    """Declares a tool from an async function ``(args: SomeModel, context) -> ToolOutput``."""

    def declare(function: ToolFunction[Any]) -> Tool[Any]:
        parameters = list(inspect.signature(function).parameters)
        hints = get_type_hints(function)
        arguments = hints.get(parameters[0]) if parameters else None
        if not (isinstance(arguments, type) and issubclass(arguments, BaseModel)):
            raise TypeError(f"tool {function.__name__}: first parameter must be a pydantic model")
        description = inspect.cleandoc(function.__doc__ or "")
        if not description:
            raise TypeError(f"tool {function.__name__}: the docstring is its description")
        return Tool(
            name=function.__name__,
            description=description,
            arguments=arguments,
            function=function,
            changes_state=changes_state,
            describe=describe,
        )

    return declare


def _plain_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """pydantic's schema without $refs, titles or ``anyOf [X, null]``: what small models read."""
    definitions = schema.get("$defs", {})

    def plain(node: Any) -> Any:
        if isinstance(node, list):
            return [plain(item) for item in node]
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            target = definitions[node["$ref"].rsplit("/", 1)[1]]
            return plain({**target, **{k: v for k, v in node.items() if k != "$ref"}})
        options = node.get("anyOf")
        if isinstance(options, list):
            concrete = [option for option in options if option.get("type") != "null"]
            if len(concrete) == 1:
                merged = {**concrete[0], **{k: v for k, v in node.items() if k != "anyOf"}}
                return plain(merged)
        return {
            key: plain(value)
            for key, value in node.items()
            if key not in ("title", "$defs") and not (key == "default" and value is None)
        }

    result: dict[str, Any] = plain(schema)
    result.setdefault("properties", {})
    result["type"] = "object"
    return result
