"""opsmesh.chat.v1.ChatService: streamed answers, stop, history, models."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, TypeAlias

import grpc
from google.protobuf import duration_pb2, json_format, timestamp_pb2
from grpc import aio

from chat_svc.config import ChatSettings
from chat_svc.history import HistoryStore, HistoryWriter, Message
from chat_svc.model import ModelServer
from chat_svc.stops import StopSignals
from mesh.clients import identity_metadata
from mesh.clock import StrictMillis
from mesh.context import Principal, current_principal
from mesh.errors import DependencyUnavailable, InvalidArgument, NotFound, OpsmeshError
from mesh.pagination import decode_token, encode_token, page_size
from opsmesh.chat.v1 import chat_pb2, chat_pb2_grpc
from opsmesh.session.v1 import session_pb2, session_pb2_grpc

log = logging.getLogger("opsmesh.chat")

SERVICE_NAME = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name
Context: TypeAlias = "aio.ServicerContext[object, object]"
_TOKEN_KIND = "history"  # noqa: S105 - a token kind, not a secret
_ROLES = {
    "user": chat_pb2.MESSAGE_ROLE_USER,
    "assistant": chat_pb2.MESSAGE_ROLE_ASSISTANT,
    "system": chat_pb2.MESSAGE_ROLE_SYSTEM,
}
_DONE = {"stop": chat_pb2.DONE_REASON_STOP, "length": chat_pb2.DONE_REASON_LENGTH}
# How long a generation may run at most (its stop registration expires after that).
_MAX_GENERATION_SECONDS = 3600.0


def _uuid(value: str, field: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise InvalidArgument(f"{field} {value[:64]!r} is not a UUID", field=field) from None


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return duration


def _timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


# A coalesced delta stays far below gRPC's message size limit, however far behind the client is.
_MAX_DELTA_CHARS = 256 * 1024


class _Answer:
    """What the model said so far; deltas are coalesced while the client is slow."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.thinking: list[str] = []
        self.unsent: collections.deque[tuple[str, str]] = collections.deque()
        self.final: Any = None
        self.first_token_at: float | None = None
        self.ready = asyncio.Event()

    def add(self, content: str, thinking: str) -> None:
        self.text.append(content)
        self.thinking.append(thinking)
        self.unsent.append((content, thinking))
        self.ready.set()

    def take(self) -> chat_pb2.TokenDelta:
        """Everything not sent yet (up to a size bound) as one delta."""
        content: list[str] = []
        thinking: list[str] = []
        size = tokens = 0
        while self.unsent and (tokens == 0 or size < _MAX_DELTA_CHARS):
            text, thought = self.unsent.popleft()
            content.append(text)
            thinking.append(thought)
            size += len(text) + len(thought)
            tokens += 1
        if not self.unsent:
            self.ready.clear()
        return chat_pb2.TokenDelta(
            content="".join(content), thinking="".join(thinking), token_count=tokens
        )


class ChatService(chat_pb2_grpc.ChatServiceServicer):
    def __init__(
        self,
        *,
        settings: ChatSettings,
        models: ModelServer,
        history: HistoryStore,
        writer: HistoryWriter,
        stops: StopSignals,
        sessions: session_pb2_grpc.SessionServiceAsyncStub,
    ) -> None:
        self._settings = settings
        self._models = models
        self._history = history
        self._writer = writer
        self._stops = stops
        self._sessions = sessions
        # History lists by (timestamp, message id): an answer must never tie with its question.
        self._clock = StrictMillis()

    def _stamp(self) -> datetime:
        return datetime.fromtimestamp(self._clock.next() / 1000, UTC)

    async def _session(self, principal: Principal, session_id: str) -> session_pb2.Session:
        try:
            reply = await self._sessions.GetSession(
                session_pb2.GetSessionRequest(session_id=session_id),
                metadata=identity_metadata(principal),
                timeout=5,
            )
        except aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound(f"session {session_id} not found") from None
            raise DependencyUnavailable("session service", error.details() or "") from error
        return reply.session

    async def _earlier(self, principal: Principal, session_id: str) -> list[Message]:
        if not self._settings.history_turns:
            return []
        return await self._history.page(
            org_id=principal.org_id,
            user_id=principal.user_id,
            session_id=session_id,
            limit=self._settings.history_turns,
            newest_first=True,
            after=None,
        )

    async def _prompt(
        self, principal: Principal, session_id: str, text: str
    ) -> list[dict[str, str]]:
        # The session (ownership, context) and the earlier turns are fetched together.
        session, earlier = await asyncio.gather(
            self._session(principal, session_id), self._earlier(principal, session_id)
        )
        messages: list[dict[str, str]] = []
        if session.context.fields:
            context = json_format.MessageToJson(session.context, indent=None)
            messages.append({"role": "system", "content": f"Session context: {context}"})
        messages += [{"role": m.role, "content": m.content} for m in reversed(earlier)]
        messages.append({"role": "user", "content": text})
        return messages

    async def StreamChat(
        self, request: chat_pb2.StreamChatRequest, context: Context
    ) -> AsyncIterator[chat_pb2.StreamChatResponse]:
        principal = current_principal()
        session_id = _uuid(request.session_id, "session_id")
        text = request.message
        if not text.strip():
            raise InvalidArgument("message must not be empty", field="message")
        if len(text) > self._settings.max_message_chars:
            raise InvalidArgument(
                f"message is longer than {self._settings.max_message_chars} characters",
                field="message",
            )
        model = self._models.choose(request.model)
        options: dict[str, Any] = {}
        if request.options.HasField("temperature"):
            if not 0 <= request.options.temperature <= 2:
                raise InvalidArgument(
                    "options.temperature must be 0 to 2", field="options.temperature"
                )
            options["temperature"] = request.options.temperature
        if request.options.HasField("max_tokens"):
            options["num_predict"] = request.options.max_tokens
        if request.options.HasField("seed"):
            options["seed"] = request.options.seed
        prompt = await self._prompt(principal, session_id, text)

        generation_id = str(uuid.uuid4())
        user_message_id = str(uuid.uuid4())
        assistant_message_id = str(uuid.uuid4())
        stopped = await self._stops.register(generation_id, principal, _MAX_GENERATION_SECONDS)
        accepted = time.perf_counter()
        self._writer.add(
            Message(
                message_id=user_message_id,
                session_id=session_id,
                user_id=principal.user_id,
                org_id=principal.org_id,
                role="user",
                content=text,
                timestamp=self._stamp(),
                metadata={"model": model},
            )
        )
        answer = _Answer()
        producer = asyncio.create_task(self._produce(model, prompt, options, answer))
        sequence = 0

        def event(**kind: Any) -> chat_pb2.StreamChatResponse:
            nonlocal sequence
            sequence += 1
            return chat_pb2.StreamChatResponse(sequence=sequence, **kind)

        done_reason = chat_pb2.DONE_REASON_UNSPECIFIED
        failure: BaseException | None = None
        try:
            yield event(
                started=chat_pb2.Started(
                    generation_id=generation_id,
                    model=model,
                    user_message_id=user_message_id,
                    assistant_message_id=assistant_message_id,
                    session_id=session_id,
                )
            )
            stop_wait = asyncio.ensure_future(stopped.wait())
            try:
                while True:
                    ready = asyncio.ensure_future(answer.ready.wait())
                    await asyncio.wait(
                        {ready, producer, stop_wait}, return_when=asyncio.FIRST_COMPLETED
                    )
                    ready.cancel()
                    if answer.unsent:
                        yield event(delta=answer.take())
                        continue
                    if stop_wait.done():
                        done_reason = chat_pb2.DONE_REASON_CANCELLED
                        break
                    if producer.done():
                        break
            finally:
                stop_wait.cancel()
            if done_reason == chat_pb2.DONE_REASON_CANCELLED:
                producer.cancel()
                await asyncio.gather(producer, return_exceptions=True)
            else:
                producer.result()  # raises what the model server did
                done_reason = _DONE.get(
                    answer.final.done_reason or "stop", chat_pb2.DONE_REASON_STOP
                )
            yield event(
                completed=self._completed(answer, done_reason, assistant_message_id, accepted)
            )
        except BaseException as error:
            failure = error
            raise
        finally:
            producer.cancel()  # closes the model server's stream at once
            await asyncio.gather(producer, return_exceptions=True)
            await self._stops.finished(generation_id)
            self._record_answer(
                principal, session_id, assistant_message_id, model, answer, done_reason, failure
            )

    async def _produce(
        self, model: str, prompt: list[dict[str, str]], options: dict[str, Any], answer: _Answer
    ) -> None:
        async for part in self._models.stream(model=model, messages=prompt, options=options):
            content = part.message.content or ""
            thinking = getattr(part.message, "thinking", None) or ""
            if (content or thinking) and answer.first_token_at is None:
                answer.first_token_at = time.perf_counter()
            if content or thinking:
                answer.add(content, thinking)
            if part.done:
                answer.final = part

    def _completed(
        self, answer: _Answer, done_reason: int, message_id: str, accepted: float
    ) -> chat_pb2.Completed:
        usage = chat_pb2.Usage()
        final = answer.final
        if final is not None:
            usage.prompt_tokens = final.prompt_eval_count or 0
            usage.completion_tokens = final.eval_count or 0
            if final.eval_duration:
                usage.tokens_per_second = (final.eval_count or 0) / (final.eval_duration / 1e9)
            usage.total_duration.CopyFrom(_duration((final.total_duration or 0) / 1e9))
            usage.load_duration.CopyFrom(_duration((final.load_duration or 0) / 1e9))
        if answer.first_token_at is not None:
            usage.time_to_first_token.CopyFrom(_duration(answer.first_token_at - accepted))
        return chat_pb2.Completed(
            done_reason=done_reason,  # type: ignore[arg-type]
            raw_done_reason=(final.done_reason or "") if final is not None else "cancelled",
            usage=usage,
            assistant_message_id=message_id,
            incomplete=final is None,
        )

    def _record_answer(
        self,
        principal: Principal,
        session_id: str,
        message_id: str,
        model: str,
        answer: _Answer,
        done_reason: int,
        failure: BaseException | None,
    ) -> None:
        incomplete = answer.final is None
        metadata: dict[str, Any] = {"model": model}
        if answer.final is not None:
            metadata.update(
                done_reason=answer.final.done_reason or "stop",
                prompt_tokens=answer.final.prompt_eval_count or 0,
                completion_tokens=answer.final.eval_count or 0,
            )
        elif isinstance(failure, OpsmeshError):
            metadata["error"] = failure.message
        elif failure is not None:
            metadata["error"] = "cancelled by the client"
        elif done_reason == chat_pb2.DONE_REASON_CANCELLED:
            metadata["error"] = "stopped by the user"
        thinking = "".join(answer.thinking)
        if thinking:
            metadata["thinking"] = thinking
        self._writer.add(
            Message(
                message_id=message_id,
                session_id=session_id,
                user_id=principal.user_id,
                org_id=principal.org_id,
                role="assistant",
                content="".join(answer.text),
                timestamp=self._stamp(),
                metadata=metadata,
                incomplete=incomplete,
            )
        )

    async def StopGeneration(
        self, request: chat_pb2.StopGenerationRequest, context: Context
    ) -> chat_pb2.StopGenerationResponse:
        generation_id = _uuid(request.generation_id, "generation_id")
        stopped = await self._stops.request_stop(generation_id, current_principal())
        if stopped is None:
            raise NotFound(f"generation {generation_id} not found")
        return chat_pb2.StopGenerationResponse(stopped=stopped)

    async def DecideToolCall(
        self, request: chat_pb2.DecideToolCallRequest, context: Context
    ) -> chat_pb2.DecideToolCallResponse:
        _uuid(request.generation_id, "generation_id")
        # Agents with tools (and so approvals) are not enabled yet: nothing ever waits.
        raise NotFound(
            f"no tool call {request.tool_call_id[:64]!r} waits for a decision in generation "
            f"{request.generation_id}"
        )

    async def GetHistory(
        self, request: chat_pb2.GetHistoryRequest, context: Context
    ) -> chat_pb2.GetHistoryResponse:
        principal = current_principal()
        session_id = _uuid(request.session_id, "session_id")
        limit = page_size(request.page_size, default=100, maximum=500)
        cursor = decode_token(request.page_token, _TOKEN_KIND)
        after = None
        if cursor is not None:
            millis, _, message_id = cursor.partition("|")
            try:
                after = (
                    datetime.fromtimestamp(int(millis) / 1000, UTC),
                    str(uuid.UUID(message_id)),
                )
            except ValueError:
                raise InvalidArgument(
                    "page_token is not a token of this list", field="page_token"
                ) from None
        newest_first = request.order != chat_pb2.HISTORY_ORDER_OLDEST_FIRST
        messages = await self._history.page(
            org_id=principal.org_id,
            user_id=principal.user_id,
            session_id=session_id,
            limit=limit + 1,
            newest_first=newest_first,
            after=after,
        )
        more = len(messages) > limit
        messages = messages[:limit]
        token = ""
        if more:
            last = messages[-1]
            token = encode_token(
                _TOKEN_KIND, f"{int(last.timestamp.timestamp() * 1000)}|{last.message_id}"
            )
        return chat_pb2.GetHistoryResponse(
            messages=[self._to_proto(m) for m in messages], next_page_token=token
        )

    @staticmethod
    def _to_proto(message: Message) -> chat_pb2.ChatMessage:
        proto = chat_pb2.ChatMessage(
            id=message.message_id,
            session_id=message.session_id,
            user_id=message.user_id,
            org_id=message.org_id,
            role=_ROLES.get(message.role, chat_pb2.MESSAGE_ROLE_UNSPECIFIED),
            content=message.content,
            created_at=_timestamp(message.timestamp),
            incomplete=message.incomplete,
        )
        proto.metadata.update(message.metadata)
        return proto

    async def ListModels(
        self, request: chat_pb2.ListModelsRequest, context: Context
    ) -> chat_pb2.ListModelsResponse:
        settings = self._models.settings
        result = []
        for model in await self._models.models():
            name = model.model or ""
            details = model.details
            entry = chat_pb2.Model(
                name=name,
                size_bytes=model.size or 0,
                family=(details.family if details else "") or "",
                parameter_size=(details.parameter_size if details else "") or "",
                quantization_level=(details.quantization_level if details else "") or "",
                allowed=not settings.allowed or name in settings.allowed,
                is_default=name == settings.default,
            )
            if model.modified_at is not None:
                entry.modified_at.CopyFrom(_timestamp(model.modified_at))
            result.append(entry)
        return chat_pb2.ListModelsResponse(models=result)
