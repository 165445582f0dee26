"""The model server (Ollama) behind explicit timeouts, careful retries and precise errors.

Retries (with exponential backoff and jitter) happen only before the first token:
connection refused, 503 (queue full) and 429. Once tokens flowed nothing is
retried. Every NDJSON line is checked for ``error`` (mid-stream errors arrive
with HTTP 200); a stream that ends without its final ``done`` line is a
truncated answer. Closing the iterator closes the HTTP
stream, which makes Ollama stop generating.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx
import ollama

from chat_svc.parts import LineError, Part, parse_line
from mesh.backoff import half_jitter
from mesh.errors import (
    DeadlineExceeded,
    DependencyUnavailable,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from mesh.settings import fixed, integer, seconds, setting, string, words
from opsmesh.errors.v1 import errors_pb2

log = logging.getLogger("opsmesh.model")

# A line is one token, or a tool call with its arguments: a megabyte is far beyond either.
_MAX_LINE_BYTES = 1 << 20


def _model_host(raw: str) -> str:
    return raw if "://" in raw else f"http://{raw}"


@dataclass(frozen=True, kw_only=True)
class ModelSettings:
    host: str = setting("OLLAMA_HOST", "http://127.0.0.1:11434", _model_host)
    allowed: tuple[str, ...] = words("OPSMESH_CHAT_MODELS")
    """Models requests may name; empty allows whatever the server has."""
    chosen_default: str = string(
        "OPSMESH_CHAT_DEFAULT_MODEL",
        doc="empty: the first of OPSMESH_CHAT_MODELS, else llama3.2:3b",
    )
    connect_timeout: float = seconds(
        "OPSMESH_OLLAMA_CONNECT_TIMEOUT", 5.0, minimum=0.1, maximum=120
    )
    first_token_timeout: float = seconds(
        "OPSMESH_OLLAMA_FIRST_TOKEN_TIMEOUT", 300.0, minimum=1, maximum=3600
    )
    """Model load plus prompt evaluation may take this long."""
    idle_timeout: float = seconds("OPSMESH_OLLAMA_IDLE_TIMEOUT", 60.0, minimum=0.1, maximum=3600)
    """Longest silence between two tokens."""
    retries: int = integer("OPSMESH_OLLAMA_RETRIES", 3, minimum=0, maximum=20)
    backoff_base: float = fixed(0.5, why="tests shorten the retry backoff")
    backoff_cap: float = fixed(8.0, why="tests shorten the retry backoff")
    max_connections: int = integer("OPSMESH_OLLAMA_MAX_CONNECTIONS", 1024, minimum=1, maximum=65536)
    """Concurrent HTTP connections to the model server (one per streaming answer)."""

    @property
    def default(self) -> str:
        """The model of requests that name none."""
        return self.chosen_default or (self.allowed[0] if self.allowed else "llama3.2:3b")

    def check(self, problems: list[str]) -> None:
        if self.allowed and self.default not in self.allowed:
            problems.append(
                f"OPSMESH_CHAT_DEFAULT_MODEL={self.default!r} is not in OPSMESH_CHAT_MODELS"
            )


def _backoff(attempt: int, settings: ModelSettings) -> float:
    return half_jitter(attempt, base=settings.backoff_base, cap=settings.backoff_cap)


class _RefusedError(Exception):
    """The model server answered the chat request with an HTTP error before streaming."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ModelServer:
    def __init__(self, settings: ModelSettings) -> None:
        self.settings = settings
        self._chat_url = f"{settings.host.rstrip('/')}/api/chat"
        # The official client lists models; answers stream over aiohttp (C HTTP parser, one
        # small part per line) because that path runs once per token.
        self._client = ollama.AsyncClient(
            host=settings.host,
            timeout=httpx.Timeout(connect=settings.connect_timeout, read=30.0, write=30.0, pool=5),
        )
        self._http: aiohttp.ClientSession | None = None

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.settings.max_connections),
                # Reads are bounded per token (first token, then idle), not per socket read.
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=self.settings.connect_timeout, sock_read=None
                ),
                read_bufsize=_MAX_LINE_BYTES,
            )
        return self._http

    def choose(self, requested: str) -> str:
        model = requested or self.settings.default
        if self.settings.allowed and model not in self.settings.allowed:
            raise InvalidArgument(
                f"model {model[:80]!r} is not allowed here; allowed: "
                + ", ".join(self.settings.allowed),
                field="model",
            )
        return model

    def _unreachable(self, error: BaseException) -> DependencyUnavailable:
        return DependencyUnavailable(
            "ollama", f"the model server at {self.settings.host} is unreachable ({error})"
        )

    async def models(self) -> list[Any]:
        try:
            listing = await self._client.list()
        except (httpx.TransportError, ConnectionError) as error:
            raise self._unreachable(error) from error
        except ollama.ResponseError as error:
            raise Unavailable(f"the model server failed to list models: {error.error}") from error
        return list(listing.models)

    async def stream(
        self,
        *,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        options: Mapping[str, Any],
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> AsyncIterator[Part]:
        """The answer's parts; retried only until the first one arrived. Leaving early closes
        the HTTP stream, which makes Ollama stop generating."""
        body: dict[str, Any] = {"model": model, "messages": list(messages), "stream": True}
        if tools:
            body["tools"] = list(tools)
        if options:
            body["options"] = dict(options)
        response, first = await self._open(model, body)
        complete = False
        try:
            yield first
            if not first.done:
                async for part in self._rest(response):
                    yield part
            complete = True
        finally:
            if complete:
                response.release()  # the connection goes back to the pool
            else:
                response.close()

    async def _open(self, model: str, body: dict[str, Any]) -> tuple[Any, Part]:
        """Sends the request and waits for its first part, retrying what is safe to retry."""
        attempt = 0
        while True:
            attempt += 1
            try:
                async with asyncio.timeout(self.settings.first_token_timeout):
                    return await self._first(body)
            except _RefusedError as error:
                retry = error.status in (429, 503) and attempt <= self.settings.retries
                if not retry:
                    raise self._refusal(model, error, attempt) from None
            except (aiohttp.ClientConnectionError, OSError) as error:
                if attempt > self.settings.retries:
                    raise self._unreachable(error) from error
            except TimeoutError as error:
                raise DeadlineExceeded(
                    f"the model produced no token within {self.settings.first_token_timeout:g}s"
                ) from error
            await asyncio.sleep(_backoff(attempt, self.settings))

    async def _first(self, body: dict[str, Any]) -> tuple[Any, Part]:
        response = await self._session().post(self._chat_url, json=body)
        try:
            if response.status != 200:
                raise _RefusedError(response.status, await _error_of(response))
            while True:
                line = await response.content.readline()
                if not line:
                    raise Unavailable("the model server ended the answer before it began")
                try:
                    part = parse_line(line)
                except LineError as error:
                    raise Unavailable(f"the model server failed: {error.message}") from None
                if part is not None:
                    return response, part
        except BaseException:
            response.close()
            raise

    def _refusal(self, model: str, error: _RefusedError, attempt: int) -> Exception:
        if error.status == 404:
            return FailedPrecondition(
                f"model {model!r} is not on the model server ({error.message}); pull it "
                f"with `ollama pull {model}`",
                reason=errors_pb2.ERROR_REASON_MODEL_NOT_FOUND,
            )
        if error.status in (429, 503):
            return ResourceExhausted(
                f"the model server is busy ({error.status}); try again shortly",
                reason=errors_pb2.ERROR_REASON_MODEL_SERVER_BUSY,
                retry_after=_backoff(attempt, self.settings),
            )
        return Unavailable(f"the model server failed: {error.message}")

    async def _rest(self, response: Any) -> AsyncIterator[Part]:
        """The parts after the first, each within the idle timeout: one watchdog moved per part
        (a ``wait_for`` per token would create a task per token)."""
        loop = asyncio.get_running_loop()
        content = response.content
        try:
            async with asyncio.timeout(None) as idle:
                while True:
                    idle.reschedule(loop.time() + self.settings.idle_timeout)
                    part = _mid_answer(await _read_line(content))
                    if part is None:
                        continue
                    idle.reschedule(None)  # the consumer's time between parts is not idleness
                    yield part
                    if part.done:
                        return
        except TimeoutError as error:
            raise DeadlineExceeded(
                f"the model stalled: no token for {self.settings.idle_timeout:g}s"
            ) from error

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
        await self._client.close()  # type: ignore[no-untyped-call]


async def _error_of(response: Any) -> str:
    """The ``error`` of an HTTP error answer (Ollama sends JSON), else its text."""
    text = (await response.text(errors="replace"))[:500]
    try:
        data = json.loads(text)
    except ValueError:
        return text or f"HTTP {response.status}"
    return str(data.get("error", text)) if isinstance(data, dict) else text


async def _read_line(content: Any) -> bytes:
    try:
        line: bytes = await content.readline()
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as error:
        raise Unavailable(
            f"the model server's stream broke off mid-answer ({type(error).__name__})"
        ) from error
    except ValueError as error:  # longer than the read buffer
        raise Unavailable(f"the model server sent a line over {_MAX_LINE_BYTES} bytes") from error
    if not line:
        raise Unavailable("the model server's stream ended before the answer was complete")
    return line


def _mid_answer(line: bytes) -> Part | None:
    try:
        return parse_line(line)
    except LineError as error:
        raise Unavailable(f"the model failed mid-answer: {error.message}") from None
