"""opsmesh.chat.v1.ChatService: streamed answers, stop, history, models."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
from google.protobuf import json_format

from chat_svc.agents.catalog import Agent
from chat_svc.agents.tools import ToolContext
from chat_svc.approvals import Approvals
from chat_svc.config import ChatSettings
from chat_svc.generation import Generation
from chat_svc.history import HistoryStore, HistoryWriter, Message, merged
from chat_svc.model import ModelServer
from chat_svc.recent import RecentTurns, Turn
from chat_svc.stops import StopSignals
from chat_svc.turns import Claim, Turns, replay
from mesh.clients import identity_metadata
from mesh.clock import StrictMillis
from mesh.context import Principal, current_principal
from mesh.downstream import Deadline, downstream_errors
from mesh.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OpsmeshError,
)
from mesh.pagination import decode_token, encode_token, page_size
from mesh.protos import timestamp_from_datetime, timestamp_from_millis
from mesh.redisbatch import RedisBatch
from mesh.redisconn import redis_errors
from mesh.servicer import Context, parse_uuid
from opsmesh.chat.v1 import chat_pb2, chat_pb2_grpc
from opsmesh.errors.v1 import errors_pb2
from opsmesh.session.v1 import session_pb2, session_pb2_grpc

log = logging.getLogger("opsmesh.chat")

SERVICE_NAME = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name
_TOKEN_KIND = "history"  # noqa: S105 - a token kind, not a secret
_ROLES = {
    "user": chat_pb2.MESSAGE_ROLE_USER,
    "assistant": chat_pb2.MESSAGE_ROLE_ASSISTANT,
    "system": chat_pb2.MESSAGE_ROLE_SYSTEM,
}
# How long a generation may run at most (its stop registration expires after that).
_MAX_GENERATION_SECONDS = 3600.0


@dataclass(frozen=True, kw_only=True)
class _Ask:
    """A validated StreamChat request."""

    session_id: str
    text: str
    model: str
    options: dict[str, Any]
    agent: Agent | None
    client_message_id: str


class _Transcript:
    """The events of one answer as a retry replays them (text deltas merged)."""

    def __init__(self) -> None:
        self.events: list[chat_pb2.StreamChatResponse] = []

    def add(self, event: chat_pb2.StreamChatResponse) -> None:
        last = self.events[-1] if self.events else None
        if last is not None and last.HasField("delta") and event.HasField("delta"):
            last.delta.content += event.delta.content
            last.delta.thinking += event.delta.thinking
            last.delta.token_count += event.delta.token_count
            return
        copy = chat_pb2.StreamChatResponse()
        copy.CopyFrom(event)
        copy.sequence = len(self.events) + 1
        self.events.append(copy)


class ChatService(chat_pb2_grpc.ChatServiceServicer):
    def __init__(
        self,
        *,
        settings: ChatSettings,
        models: ModelServer,
        history: HistoryStore,
        writer: HistoryWriter,
        redis: aioredis.Redis,
        stops: StopSignals,
        sessions: session_pb2_grpc.SessionServiceAsyncStub,
        approvals: Approvals,
        turns: Turns,
        recent: RecentTurns,
        agents: Mapping[int, Agent],
    ) -> None:
        self._settings = settings
        self._models = models
        self._history = history
        self._writer = writer
        self._redis = redis
        self._stops = stops
        self._sessions = sessions
        self._approvals = approvals
        self._turns = turns
        self._recent = recent
        self._agents = dict(agents)
        # Generations that wait for an approval after their client left finish in the background.
        self._detached: set[asyncio.Task[None]] = set()
        # History lists by (timestamp, message id): an answer must never tie with its question.
        self._clock = StrictMillis()

    def _stamp(self) -> datetime:
        return datetime.fromtimestamp(self._clock.next() / 1000, UTC)

    async def _session(self, principal: Principal, session_id: str) -> session_pb2.Session:
        with downstream_errors(
            "session service",
            not_found=lambda: NotFound(f"session {session_id} not found"),
            only_transient=False,
        ):
            reply = await self._sessions.GetSession(
                session_pb2.GetSessionRequest(session_id=session_id),
                metadata=identity_metadata(principal),
                timeout=Deadline.LOOKUP,
            )
        return reply.session

    async def _history_page(
        self,
        principal: Principal,
        session_id: str,
        *,
        limit: int,
        newest_first: bool,
        after: tuple[datetime, str] | None = None,
    ) -> list[Message]:
        """A page of the session's history: ClickHouse's and the messages still on their way."""
        owner = {"org_id": principal.org_id, "user_id": principal.user_id, "session_id": session_id}
        stored = await self._history.page(
            **owner, limit=limit, newest_first=newest_first, after=after
        )
        return merged(
            stored,
            self._writer.unwritten(**owner),
            limit=limit,
            newest_first=newest_first,
            after=after,
        )

    async def _earlier(self, principal: Principal, session_id: str) -> list[Turn]:
        """The session's turns from the durable history, oldest first (the cache's fallback)."""
        newest = await self._history_page(
            principal, session_id, limit=self._settings.history_turns, newest_first=True
        )
        return [Turn(m.role, m.content) for m in reversed(newest)]

    async def _context(
        self, principal: Principal, session_id: str
    ) -> tuple[session_pb2.Session, list[Turn], list[Turn] | None]:
        """The session (its ownership, its context) and its earlier turns, read together; and
        the turns to start the recent-turns cache with (None: it has them already)."""
        if not self._settings.history_turns:
            return await self._session(principal, session_id), [], None
        owner = (principal.org_id, principal.user_id, session_id)
        session, (cached, epoch) = await asyncio.gather(
            self._session(principal, session_id), self._recent.read(*owner)
        )
        if cached is not None:
            return session, cached, None
        if self._recent.covers(session.created_at.ToDatetime(tzinfo=UTC), epoch):
            earlier: list[Turn] = []
        else:
            earlier = await self._earlier(principal, session_id)
        # The cache starts with the question's append (one round trip less before the model).
        return session, earlier, earlier

    async def _prompt(
        self, principal: Principal, ask: _Ask
    ) -> tuple[list[dict[str, Any]], list[Turn] | None]:
        """The model's messages and the turns to seed the recent-turns cache with, if any."""
        session, earlier, seed = await self._context(principal, ask.session_id)
        messages: list[dict[str, Any]] = []
        if ask.agent is not None:
            messages.append({"role": "system", "content": ask.agent.system_prompt})
        if session.context.fields:
            context = json_format.MessageToJson(session.context, indent=None)
            messages.append({"role": "system", "content": f"Session context: {context}"})
        messages += [{"role": turn.role, "content": turn.content} for turn in earlier]
        messages.append({"role": "user", "content": ask.text})
        return messages, seed

    def _validate(self, request: chat_pb2.StreamChatRequest) -> _Ask:
        session_id = parse_uuid(request.session_id, "session_id")
        text = request.message
        if not text.strip():
            raise InvalidArgument("message must not be empty", field="message")
        if len(text) > self._settings.max_message_chars:
            raise InvalidArgument(
                f"message is longer than {self._settings.max_message_chars} characters",
                field="message",
            )
        client_message_id = ""
        if request.client_message_id:
            client_message_id = parse_uuid(request.client_message_id, "client_message_id")
        return _Ask(
            session_id=session_id,
            text=text,
            model=self._models.choose(request.model),
            options=self._options(request.options),
            agent=self._agent(request.agent),
            client_message_id=client_message_id,
        )

    @staticmethod
    def _options(requested: chat_pb2.GenerationOptions) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if requested.HasField("temperature"):
            if not 0 <= requested.temperature <= 2:
                raise InvalidArgument(
                    "options.temperature must be 0 to 2", field="options.temperature"
                )
            options["temperature"] = requested.temperature
        if requested.HasField("max_tokens"):
            if requested.max_tokens < 1:
                raise InvalidArgument(
                    "options.max_tokens must be positive", field="options.max_tokens"
                )
            options["num_predict"] = requested.max_tokens
        if requested.HasField("seed"):
            options["seed"] = requested.seed
        return options

    def _agent(self, requested: int) -> Agent | None:
        if requested == chat_pb2.AGENT_UNSPECIFIED:
            return None
        agent = self._agents.get(requested)
        if agent is None:
            raise InvalidArgument(f"unknown agent {requested}", field="agent")
        if not agent.tools:
            raise FailedPrecondition(
                f"the {agent.name} agent is not available in this deployment: {agent.missing}",
                reason=errors_pb2.ERROR_REASON_AGENT_UNAVAILABLE,
            )
        return agent

    async def StreamChat(
        self, request: chat_pb2.StreamChatRequest, context: Context
    ) -> AsyncIterator[chat_pb2.StreamChatResponse]:
        principal = current_principal()
        ask = self._validate(request)
        generation_id = str(uuid.uuid4())
        user_message_id = str(uuid.uuid4())
        claim: Claim | None = None
        if ask.client_message_id:
            claim = await self._turns.claim(
                principal,
                ask.session_id,
                ask.client_message_id,
                generation_id=generation_id,
                user_message_id=user_message_id,
            )
            if not claim.claimed:
                if claim.record.get("state") == "done":
                    for event in replay(claim.record):
                        yield event
                    return
                raise AlreadyExists(
                    f"message {ask.client_message_id} is still being answered",
                    reason=errors_pb2.ERROR_REASON_MESSAGE_IN_PROGRESS,
                    metadata={"generation_id": str(claim.record.get("generation_id", ""))},
                )
            user_message_id = claim.user_message_id
        try:
            generation, seed = await self._generation(
                principal, ask, generation_id, user_message_id
            )
            # The stop signal and the question's record: one Redis round trip.
            batch = RedisBatch(self._redis)
            stopped = self._stops.register(batch, generation_id, principal, _MAX_GENERATION_SECONDS)
            self._record_question(batch, principal, ask, user_message_id, claim, seed)
            with redis_errors():
                await batch.run()
        except BaseException:
            await self._stops.finished(generation_id)
            if claim is not None:
                await self._turns.fail(principal, ask.session_id, ask.client_message_id, claim)
            raise
        async for event in self._relay(generation, stopped, claim):
            yield event

    def _record_question(
        self,
        batch: RedisBatch,
        principal: Principal,
        ask: _Ask,
        user_message_id: str,
        claim: Claim | None,
        seed: list[Turn] | None,
    ) -> None:
        if claim is not None and claim.question_recorded:
            # A retry of a failed turn: its question is in the history (and in ``seed``) already.
            if seed is not None:
                self._recent.seed(batch, principal.org_id, principal.user_id, ask.session_id, seed)
            return
        self._record(
            batch,
            Message(
                message_id=user_message_id,
                session_id=ask.session_id,
                user_id=principal.user_id,
                org_id=principal.org_id,
                role="user",
                content=ask.text,
                timestamp=self._stamp(),
                metadata={"model": ask.model},
            ),
            seed=seed,
        )

    def _record(
        self, batch: RedisBatch, message: Message, *, seed: list[Turn] | None = None
    ) -> None:
        """Into the durable history (batched, off the request path) and, with ``batch``, the
        recent turns (started with ``seed`` if the cache has no list for the session yet)."""
        self._writer.add(message)
        if self._settings.history_turns:
            self._recent.append(
                batch,
                message.org_id,
                message.user_id,
                message.session_id,
                Turn(message.role, message.content),
                seed=seed,
            )

    async def _generation(
        self, principal: Principal, ask: _Ask, generation_id: str, user_message_id: str
    ) -> tuple[Generation, list[Turn] | None]:
        """The generation, and the turns to seed the recent-turns cache with (see _prompt)."""
        messages, seed = await self._prompt(principal, ask)
        generation = Generation(
            generation_id=generation_id,
            session_id=ask.session_id,
            principal=principal,
            model=ask.model,
            options=ask.options,
            messages=messages,
            agent=ask.agent,
            tool_context=ToolContext(principal=principal, metadata=identity_metadata(principal)),
            models=self._models,
            approvals=self._approvals,
            user_message_id=user_message_id,
            assistant_message_id=str(uuid.uuid4()),
            client_message_id=ask.client_message_id,
        )
        return generation, seed

    async def _relay(
        self, generation: Generation, stopped: asyncio.Event, claim: Claim | None
    ) -> AsyncIterator[chat_pb2.StreamChatResponse]:
        """The generation's events to the client; cancelling stops it unless it awaits approval."""
        producer = asyncio.create_task(generation.run())
        stop_wait = asyncio.ensure_future(stopped.wait())
        # One wake-up event for all three sources: no future or task per token on this path.
        wake = generation.feed.ready
        producer.add_done_callback(lambda _: wake.set())
        stop_wait.add_done_callback(lambda _: wake.set())
        transcript = _Transcript() if claim is not None else None
        sequence = 0
        detached = completed = False
        failure: BaseException | None = None

        def event(**kind: Any) -> chat_pb2.StreamChatResponse:
            nonlocal sequence
            sequence += 1
            response = chat_pb2.StreamChatResponse(sequence=sequence, **kind)
            if transcript is not None:
                transcript.add(response)
            return response

        interval = self._settings.delta_interval
        loop = asyncio.get_running_loop()
        next_flush = 0.0
        try:
            yield event(started=generation.started())
            while True:
                await wake.wait()
                if interval and not (stop_wait.done() or producer.done()):
                    # Pace deltas after the first (time to first token is untouched): tokens that
                    # arrive meanwhile share one message instead of one message each.
                    if (pause := next_flush - loop.time()) > 0:
                        await asyncio.sleep(pause)
                    next_flush = loop.time() + interval
                while (kind := generation.feed.take()) is not None:
                    yield event(**kind)
                if stop_wait.done() or producer.done():
                    break
            done_reason: int
            if stop_wait.done() and not producer.done():
                producer.cancel()
                await asyncio.gather(producer, return_exceptions=True)
                done_reason = chat_pb2.DONE_REASON_CANCELLED
            else:
                producer.result()  # raises what the model server did
                done_reason = generation.done_reason()
            yield event(completed=generation.completed(done_reason))
            completed = True
        except BaseException as error:
            failure = error
            if isinstance(error, asyncio.CancelledError | GeneratorExit) and (
                generation.awaiting_approval and not producer.done()
            ):
                detached = True
                self._finish_detached(generation, producer, stop_wait, claim, transcript)
            raise
        finally:
            if not detached:
                stop_wait.cancel()
                producer.cancel()  # closes the model server's stream at once
                await asyncio.gather(producer, return_exceptions=True)
                await self._finish(
                    generation,
                    failure=failure,
                    stopped=stop_wait.done() and not stop_wait.cancelled(),
                    claim=claim,
                    transcript=transcript if completed else None,
                )

    def _finish_detached(
        self,
        generation: Generation,
        producer: asyncio.Task[None],
        stop_wait: asyncio.Future[Any],
        claim: Claim | None,
        transcript: _Transcript | None,
    ) -> None:
        """Lets a generation whose client left finish once its approvals are decided.

        What it says meanwhile goes on into the transcript, so a retry of the message
        replays the whole answer instead of asking the model again.
        """

        async def finish() -> None:
            failure: BaseException | None = None
            whole = False
            try:
                await asyncio.wait({producer, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                if not producer.done():
                    producer.cancel()
                await asyncio.gather(producer, return_exceptions=True)
                cancelled = producer.cancelled()
                failure = asyncio.CancelledError() if cancelled else producer.exception()
                if transcript is not None and failure is None:
                    while (kind := generation.feed.take()) is not None:
                        transcript.add(chat_pb2.StreamChatResponse(**kind))
                    done = generation.completed(generation.done_reason())
                    transcript.add(chat_pb2.StreamChatResponse(completed=done))
                    whole = True
            finally:
                stop_wait.cancel()
                await self._finish(
                    generation,
                    failure=failure,
                    stopped=stop_wait.done() and not stop_wait.cancelled(),
                    claim=claim,
                    transcript=transcript if whole else None,
                )

        task = asyncio.create_task(finish(), name=f"detached-{generation.generation_id}")
        self._detached.add(task)
        task.add_done_callback(self._detached.discard)

    async def _finish(
        self,
        generation: Generation,
        *,
        failure: BaseException | None,
        stopped: bool,
        claim: Claim | None,
        transcript: _Transcript | None,
    ) -> None:
        """Records the answer once, whatever ended it, and releases what the generation held."""
        principal = generation.principal
        answer = Message(
            message_id=generation.assistant_message_id,
            session_id=generation.session_id,
            user_id=principal.user_id,
            org_id=principal.org_id,
            role="assistant",
            content="".join(generation.text),
            timestamp=self._stamp(),
            metadata=generation.metadata(failure, stopped),
            incomplete=generation.final is None,
        )
        # The generation's end and the answer's record: one Redis round trip.
        batch = RedisBatch(self._redis)
        self._stops.unregister(batch, generation.generation_id)
        self._record(batch, answer)
        try:
            with redis_errors():
                await batch.run()
        except OpsmeshError as error:  # the durable history has it; the stop key expires
            log.warning("could not cache answer %s: %s", answer.message_id, error.message)
        if claim is None:
            return
        try:
            if transcript is not None and generation.final is not None:
                await self._turns.complete(
                    principal,
                    generation.session_id,
                    generation.client_message_id,
                    claim,
                    transcript.events,
                )
            else:
                await self._turns.fail(
                    principal, generation.session_id, generation.client_message_id, claim
                )
        except Exception as error:  # noqa: BLE001 - the turn record expires by itself
            log.warning("could not record turn %s: %s", generation.client_message_id, error)

    async def close(self) -> None:
        """Ends generations still waiting for an approval (at shutdown)."""
        for task in list(self._detached):
            task.cancel()
        await asyncio.gather(*self._detached, return_exceptions=True)

    async def StopGeneration(
        self, request: chat_pb2.StopGenerationRequest, context: Context
    ) -> chat_pb2.StopGenerationResponse:
        generation_id = parse_uuid(request.generation_id, "generation_id")
        stopped = await self._stops.request_stop(generation_id, current_principal())
        if stopped is None:
            raise NotFound(f"generation {generation_id} not found")
        return chat_pb2.StopGenerationResponse(stopped=stopped)

    async def DecideToolCall(
        self, request: chat_pb2.DecideToolCallRequest, context: Context
    ) -> chat_pb2.DecideToolCallResponse:
        generation_id = parse_uuid(request.generation_id, "generation_id")
        call_id = request.tool_call_id
        if not call_id or len(call_id) > 64 or not call_id.isascii() or not call_id.isprintable():
            raise InvalidArgument(
                "tool_call_id must be the id of a ToolCall event", field="tool_call_id"
            )
        if len(request.reason) > 1000:
            raise InvalidArgument("reason must be at most 1000 characters", field="reason")
        outcome = await self._approvals.decide(
            current_principal(),
            generation_id,
            call_id,
            "approved" if request.approved else "rejected",
            request.reason,
        )
        if outcome in (0, -1):
            # Another user's call is answered exactly like a call that does not exist.
            raise NotFound(
                f"no tool call {call_id!r} waits for a decision in generation {generation_id}"
            )
        return chat_pb2.DecideToolCallResponse(accepted=outcome == 1)

    async def ListApprovals(
        self, request: chat_pb2.ListApprovalsRequest, context: Context
    ) -> chat_pb2.ListApprovalsResponse:
        principal = current_principal()
        session_id = parse_uuid(request.session_id, "session_id")
        found = []
        for pending in await self._approvals.pending(principal, session_id):
            approval = chat_pb2.ApprovalRequired(
                tool_call_id=pending.tool_call_id,
                name=pending.name,
                description=pending.description,
                deadline=timestamp_from_millis(pending.deadline_ms),
            )
            approval.arguments.update(pending.arguments)
            found.append(
                chat_pb2.PendingApproval(generation_id=pending.generation_id, approval=approval)
            )
        return chat_pb2.ListApprovalsResponse(approvals=found)

    async def GetHistory(
        self, request: chat_pb2.GetHistoryRequest, context: Context
    ) -> chat_pb2.GetHistoryResponse:
        principal = current_principal()
        session_id = parse_uuid(request.session_id, "session_id")
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
        messages = await self._history_page(
            principal, session_id, limit=limit + 1, newest_first=newest_first, after=after
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
            created_at=timestamp_from_datetime(message.timestamp),
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
                entry.modified_at.CopyFrom(timestamp_from_datetime(model.modified_at))
            result.append(entry)
        return chat_pb2.ListModelsResponse(models=result)
