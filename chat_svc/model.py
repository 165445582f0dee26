"""The model server (Ollama) behind explicit timeouts, careful retries and precise errors.

Retries (with exponential backoff and jitter) happen only before the first token:
connection refused, 503 (queue full) and 429. Once tokens flowed nothing is
retried. Every NDJSON line is checked for ``error`` by the official client
(mid-stream errors arrive with HTTP 200); a stream that ends without its final
``done`` line is a truncated answer. Closing the iterator closes the HTTP
stream, which makes Ollama stop generating.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import ollama

from mesh.errors import (
    DeadlineExceeded,
    DependencyUnavailable,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from mesh.settings import EnvReader
from opsmesh.errors.v1 import errors_pb2

log = logging.getLogger("opsmesh.model")


@dataclass(frozen=True, kw_only=True)
class ModelSettings:
    host: str = "http://127.0.0.1:11434"
    allowed: tuple[str, ...] = ()
    """Models requests may name; empty allows whatever the server has."""
    default: str = "llama3.2:3b"
    connect_timeout: float = 5.0
    first_token_timeout: float = 300.0
    """Model load plus prompt evaluation may take this long."""
    idle_timeout: float = 60.0
    """Longest silence between two tokens."""
    retries: int = 3
    backoff_base: float = 0.5
    backoff_cap: float = 8.0

    @classmethod
    def from_env(cls, env: EnvReader) -> ModelSettings:
        host = env.string("OLLAMA_HOST", "http://127.0.0.1:11434")
        if "://" not in host:
            host = f"http://{host}"
        allowed = tuple(
            m.strip() for m in env.string("OPSMESH_CHAT_MODELS", "").split(",") if m.strip()
        )
        default = env.string("OPSMESH_CHAT_DEFAULT_MODEL", allowed[0] if allowed else "llama3.2:3b")
        if allowed and default not in allowed:
            env.problem(f"OPSMESH_CHAT_DEFAULT_MODEL={default!r} is not in OPSMESH_CHAT_MODELS")
        return cls(
            host=host,
            allowed=allowed,
            default=default,
            connect_timeout=env.seconds(
                "OPSMESH_OLLAMA_CONNECT_TIMEOUT", 5, minimum=0.1, maximum=120
            ),
            first_token_timeout=env.seconds(
                "OPSMESH_OLLAMA_FIRST_TOKEN_TIMEOUT", 300, minimum=1, maximum=3600
            ),
            idle_timeout=env.seconds("OPSMESH_OLLAMA_IDLE_TIMEOUT", 60, minimum=0.1, maximum=3600),
            retries=env.integer("OPSMESH_OLLAMA_RETRIES", 3, minimum=0, maximum=20),
        )


def _backoff(attempt: int, settings: ModelSettings) -> float:
    ceiling = min(settings.backoff_cap, settings.backoff_base * 2.0 ** (attempt - 1))
    return ceiling / 2 + random.uniform(0, ceiling / 2)  # noqa: S311 - jitter


class ModelServer:
    def __init__(self, settings: ModelSettings) -> None:
        self.settings = settings
        self._client = ollama.AsyncClient(
            host=settings.host,
            # Reads are bounded per token below (first token, then idle), not per socket read.
            timeout=httpx.Timeout(
                connect=settings.connect_timeout,
                read=None,
                write=30.0,
                pool=settings.connect_timeout,
            ),
        )

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
    ) -> AsyncIterator[Any]:
        """The answer's parts; retried only until the first one arrived."""
        attempt = 0
        while True:
            attempt += 1
            parts = await self._client.chat(
                model=model,
                messages=list(messages),
                tools=list(tools) if tools else None,
                stream=True,
                options=dict(options) or None,
            )
            try:
                first = await asyncio.wait_for(
                    anext(parts),
                    self.settings.first_token_timeout,
                )
            except ollama.ResponseError as error:
                await parts.aclose()  # type: ignore[attr-defined]
                if error.status_code == 404:
                    raise FailedPrecondition(
                        f"model {model!r} is not on the model server ({error.error}); pull it "
                        f"with `ollama pull {model}`",
                        reason=errors_pb2.ERROR_REASON_MODEL_NOT_FOUND,
                    ) from error
                if error.status_code in (429, 503) and attempt <= self.settings.retries:
                    await asyncio.sleep(_backoff(attempt, self.settings))
                    continue
                if error.status_code in (429, 503):
                    raise ResourceExhausted(
                        f"the model server is busy ({error.status_code}); try again shortly",
                        reason=errors_pb2.ERROR_REASON_MODEL_SERVER_BUSY,
                        retry_after=_backoff(attempt, self.settings),
                    ) from error
                raise Unavailable(f"the model server failed: {error.error}") from error
            except (httpx.ConnectError, ConnectionError) as error:
                await parts.aclose()  # type: ignore[attr-defined]
                if attempt <= self.settings.retries:
                    await asyncio.sleep(_backoff(attempt, self.settings))
                    continue
                raise self._unreachable(error) from error
            except TimeoutError as error:
                raise DeadlineExceeded(
                    f"the model produced no token within {self.settings.first_token_timeout:g}s"
                ) from error
            except StopAsyncIteration as error:
                raise Unavailable("the model server ended the answer before it began") from error
            break
        try:
            yield first
            if first.done:
                return
            while True:
                try:
                    part = await asyncio.wait_for(
                        anext(parts),
                        self.settings.idle_timeout,
                    )
                except StopAsyncIteration:
                    raise Unavailable(
                        "the model server's stream ended before the answer was complete"
                    ) from None
                except TimeoutError as error:
                    raise DeadlineExceeded(
                        f"the model stalled: no token for {self.settings.idle_timeout:g}s"
                    ) from error
                except ollama.ResponseError as error:
                    raise Unavailable(f"the model failed mid-answer: {error.error}") from error
                except httpx.TransportError as error:
                    raise Unavailable(
                        f"the model server's stream broke off mid-answer ({type(error).__name__})"
                    ) from error
                yield part
                if part.done:
                    return
        finally:
            await parts.aclose()  # type: ignore[attr-defined]

    async def close(self) -> None:
        await self._client.close()  # type: ignore[no-untyped-call]
