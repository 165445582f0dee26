"""An Ollama stand-in that speaks the real /api/chat NDJSON protocol over real HTTP.

Tests script it: the tokens and their rate, a model load delay before the first
token, 503s (queue full) before a stream starts, an ``{"error": ...}`` line
after N tokens (with HTTP 200, as Ollama does), a stall, a truncated stream,
unknown models. It records every request and when each client hung up.

Tool calling is replayed as a model does it: a scripted :class:`Reply` (or a
``responder`` that reads the request's messages and tools) may carry
``tool_calls``, sent the way Ollama streams them (a ``message.tool_calls`` chunk
with ``function.index``, then the final ``done`` line with ``done_reason: stop``);
the next request carries the ``tool`` messages back.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web


@dataclass
class Reply:
    """One scripted model turn: text tokens, then tool calls (name, arguments)."""

    tokens: list[str] = field(default_factory=list)
    tool_calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


@dataclass
class Scenario:
    tokens: list[str] = field(default_factory=lambda: ["Hello", ",", " world", "!"])
    seconds_per_token: float = 0.0
    load_seconds: float = 0.0
    refuse_next: list[int] = field(default_factory=list)
    """HTTP statuses for the next requests (e.g. 503 queue full) before any streaming."""
    error_after: int | None = None
    stall_after: int | None = None
    truncate_after: int | None = None
    script: list[Reply] = field(default_factory=list)
    """Replies for the next requests, in order (before ``responder`` and ``tokens``)."""
    responder: Callable[[dict[str, Any]], Reply] | None = None
    """Decides each reply from the request body (messages, tools), like a model would."""


@dataclass
class Seen:
    body: dict[str, Any]
    started: float
    arrived: float = 0.0
    """time.perf_counter() when the request arrived (its body read)."""
    hung_up: float | None = None
    finished: bool = False
    finished_at: float | None = None
    """time.perf_counter() when the final line was written, for the tool-round bench."""
    emitted: list[float] = field(default_factory=list)
    """Wall-clock time (time.time()) each token was written, for latency benches."""


class OllamaStandIn:
    def __init__(self, models: tuple[str, ...] = ("llama3.2:3b", "qwen2.5:7b")) -> None:
        self.models = list(models)
        self.scenario = Scenario()
        self.requests: list[Seen] = []
        app = web.Application()
        app.router.add_get("/api/tags", self._tags)
        app.router.add_post("/api/chat", self._chat)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> OllamaStandIn:
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def _tags(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "models": [
                    {
                        "name": name,
                        "model": name,
                        "modified_at": "2026-11-01T10:00:00Z",
                        "size": 2_019_393_189,
                        "digest": "a80c4f17acd5",
                        "details": {
                            "family": name.split(":")[0].rstrip("0123456789."),
                            "parameter_size": "3.2B",
                            "quantization_level": "Q4_K_M",
                            "format": "gguf",
                        },
                    }
                    for name in self.models
                ]
            }
        )

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen = Seen(body=body, started=time.monotonic(), arrived=time.perf_counter())
        self.requests.append(seen)
        scenario = self.scenario
        if scenario.refuse_next:
            status = scenario.refuse_next.pop(0)
            return web.json_response({"error": "server busy, please try again"}, status=status)
        if body.get("model") not in self.models:
            return web.json_response(
                {"error": f'model "{body.get("model")}" not found, try pulling it first'},
                status=404,
            )
        reply = self._reply(body)
        tokens, done_reason = _predict(reply.tokens, body.get("options") or {})
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        try:
            await asyncio.sleep(scenario.load_seconds)
            began = time.monotonic_ns()
            for index, token in enumerate(tokens):
                if index == scenario.error_after:
                    await self._line(
                        response,
                        {
                            "error": "an error was encountered while running the model: "
                            "CUDA out of memory"
                        },
                    )
                    return response
                if index == scenario.stall_after:
                    await asyncio.sleep(3600)
                if index == scenario.truncate_after:
                    request.transport.close()  # type: ignore[union-attr]
                    return response
                seen.emitted.append(time.time())
                await self._line(
                    response,
                    {
                        "model": body["model"],
                        "created_at": _now(),
                        "message": {"role": "assistant", "content": token},
                        "done": False,
                    },
                )
                await asyncio.sleep(scenario.seconds_per_token)
            if reply.tool_calls:
                await self._line(
                    response,
                    {
                        "model": body["model"],
                        "created_at": _now(),
                        "message": {
                            "role": "assistant",
                            "content": "",
                            "tool_calls": [
                                {"function": {"index": i, "name": name, "arguments": arguments}}
                                for i, (name, arguments) in enumerate(reply.tool_calls)
                            ],
                        },
                        "done": False,
                    },
                )
            elapsed = time.monotonic_ns() - began
            await self._line(
                response,
                {
                    "model": body["model"],
                    "created_at": _now(),
                    "message": {"role": "assistant", "content": ""},
                    "done": True,
                    "done_reason": done_reason,
                    "total_duration": elapsed + 1_000_000,
                    "load_duration": int(scenario.load_seconds * 1e9),
                    "prompt_eval_count": 12,
                    "prompt_eval_duration": 1_000_000,
                    "eval_count": len(tokens) + len(reply.tool_calls),
                    "eval_duration": max(elapsed, 1),
                },
            )
            seen.finished = True
            seen.finished_at = time.perf_counter()
            await response.write_eof()
        except (asyncio.CancelledError, ConnectionResetError):
            seen.hung_up = time.monotonic()
            raise
        return response

    def _reply(self, body: dict[str, Any]) -> Reply:
        if self.scenario.script:
            return self.scenario.script.pop(0)
        if self.scenario.responder is not None:
            return self.scenario.responder(body)
        return Reply(tokens=list(self.scenario.tokens))

    @staticmethod
    async def _line(response: web.StreamResponse, payload: dict[str, Any]) -> None:
        await response.write(json.dumps(payload).encode() + b"\n")


def _predict(tokens: list[str], options: dict[str, Any]) -> tuple[list[str], str]:
    """The tokens Ollama would emit under ``num_predict``: it stops there with ``length``."""
    limit = options.get("num_predict")
    if isinstance(limit, int) and 0 < limit < len(tokens):
        return tokens[:limit], "length"
    return tokens, "stop"


def _now() -> str:
    return datetime.now(UTC).isoformat()


def main() -> None:
    """``python -m tests.ollama_standin --port P --tokens N --seconds-per-token S``: for benches."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens", type=int, default=50)
    parser.add_argument("--seconds-per-token", type=float, default=0.02)
    args = parser.parse_args()

    async def serve() -> None:
        standin = OllamaStandIn()
        standin.scenario = Scenario(
            tokens=[f" t{i}" for i in range(args.tokens)], seconds_per_token=args.seconds_per_token
        )
        await standin._runner.setup()
        await web.TCPSite(standin._runner, "127.0.0.1", args.port).start()
        print(f"ollama stand-in listening on 127.0.0.1:{args.port}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
