"""ChatService against an Ollama stand-in over real HTTP, real Redis, sessions and chDB."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

import grpc
import pytest
import redis.asyncio as aioredis
from google.protobuf import struct_pb2
from grpc import aio

from chat_svc.config import ChatSettings
from chat_svc.history import HistoryWriter, Message, merged
from chat_svc.model import ModelSettings
from chat_svc.server import build_runner
from devtools.servers import RedisServer, free_port
from mesh.errors import DependencyUnavailable
from mesh.redisconn import RedisSettings
from mesh.server import ServiceRunner
from mesh.settings import ServerSettings
from opsmesh.chat.v1 import chat_pb2 as pb
from opsmesh.chat.v1 import chat_pb2_grpc
from opsmesh.session.v1 import session_pb2, session_pb2_grpc
from tests.conftest import FAST_HEALTH
from tests.helpers import assert_eventually, identity
from tests.ollama_standin import OllamaStandIn, Scenario


@dataclass
class ChatStack:
    stub: chat_pb2_grpc.ChatServiceStub
    sessions: session_pb2_grpc.SessionServiceStub
    ollama: OllamaStandIn
    runner: ServiceRunner
    who: tuple[tuple[str, str], ...]


def chat_settings(
    session_runner: ServiceRunner, redis_url: str, dsn: str, ollama_url: str, **model: object
) -> ChatSettings:
    return ChatSettings(
        server=ServerSettings(port=0, grace_period=1.0),
        model=replace(
            ModelSettings(
                host=ollama_url,
                chosen_default="llama3.2:3b",
                idle_timeout=2.0,
                first_token_timeout=10.0,
                backoff_base=0.01,
                backoff_cap=0.05,
            ),
            **model,  # type: ignore[arg-type]
        ),
        redis=RedisSettings(url=redis_url),
        history_dsn=dsn,
        session_address=f"127.0.0.1:{session_runner.port}",
    )


@asynccontextmanager
async def running_chat(
    session_runner: ServiceRunner, redis_url: str, history_dsn: str, **changes: object
) -> AsyncIterator[ChatStack]:
    """A chat service on its own Ollama stand-in; ``changes`` replace its settings' fields."""
    ollama = await OllamaStandIn().start()
    settings = chat_settings(session_runner, redis_url, history_dsn, ollama.url)
    runner = await build_runner(replace(settings, **changes), options=FAST_HEALTH)  # type: ignore[arg-type]
    await runner.start()
    who = identity(f"u{uuid.uuid4().hex[:8]}", "acme")
    try:
        async with (
            aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel,
            aio.insecure_channel(f"127.0.0.1:{session_runner.port}") as session_channel,
        ):
            yield ChatStack(
                chat_pb2_grpc.ChatServiceStub(channel),
                session_pb2_grpc.SessionServiceStub(session_channel),
                ollama,
                runner,
                who,
            )
    finally:
        await runner.stop()
        await ollama.stop()


@pytest.fixture
async def chat(
    session_runner: ServiceRunner, redis_server: RedisServer, history_dsn: str
) -> AsyncIterator[ChatStack]:
    async with running_chat(session_runner, redis_server.url, history_dsn) as stack:
        yield stack


async def new_session(stack: ChatStack, **context: object) -> str:
    ctx = struct_pb2.Struct()
    ctx.update(context)
    reply = await stack.sessions.CreateSession(
        session_pb2.CreateSessionRequest(context=ctx), metadata=stack.who
    )
    return reply.session.id


async def collect(call) -> list[pb.StreamChatResponse]:
    return [event async for event in call]


async def test_answer_streams_as_typed_events_and_lands_in_history(chat) -> None:
    session_id = await new_session(chat, service="checkout")
    events = await collect(
        chat.stub.StreamChat(
            pb.StreamChatRequest(session_id=session_id, message="Why is checkout slow?"),
            metadata=chat.who,
        )
    )
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "started"
    assert kinds[-1] == "completed"
    assert set(kinds[1:-1]) == {"delta"}
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert "".join(e.delta.content for e in events if e.HasField("delta")) == "Hello, world!"
    assert sum(e.delta.token_count for e in events if e.HasField("delta")) == 4
    started, completed = events[0].started, events[-1].completed
    assert started.model == "llama3.2:3b"
    assert completed.done_reason == pb.DONE_REASON_STOP
    assert not completed.incomplete
    assert (completed.usage.prompt_tokens, completed.usage.completion_tokens) == (12, 4)
    assert completed.usage.tokens_per_second > 0
    assert completed.usage.time_to_first_token.ToNanoseconds() > 0
    sent = chat.ollama.requests[-1].body
    assert sent["stream"] is True
    assert sent["messages"][0] == {
        "role": "system",
        "content": 'Session context: {"service": "checkout"}',
    }
    assert sent["messages"][-1] == {"role": "user", "content": "Why is checkout slow?"}

    async def stored() -> pb.GetHistoryResponse:
        page = await chat.stub.GetHistory(
            pb.GetHistoryRequest(session_id=session_id, order=pb.HISTORY_ORDER_OLDEST_FIRST),
            metadata=chat.who,
        )
        assert len(page.messages) == 2
        return page

    page = await assert_eventually(stored)
    user, assistant = page.messages
    assert (user.role, user.content, user.id) == (
        pb.MESSAGE_ROLE_USER,
        "Why is checkout slow?",
        started.user_message_id,
    )
    assert (assistant.role, assistant.content) == (pb.MESSAGE_ROLE_ASSISTANT, "Hello, world!")
    assert assistant.id == completed.assistant_message_id
    assert not assistant.incomplete
    assert assistant.metadata["completion_tokens"] == 4

    # The next turn carries the conversation so far.
    await collect(
        chat.stub.StreamChat(
            pb.StreamChatRequest(session_id=session_id, message="And now?"), metadata=chat.who
        )
    )
    roles = [m["role"] for m in chat.ollama.requests[-1].body["messages"]]
    assert roles == ["system", "user", "assistant", "user"]


async def test_history_pages_both_ways_and_stays_with_its_owner(chat) -> None:
    session_id = await new_session(chat)
    for turn in range(3):
        await collect(
            chat.stub.StreamChat(
                pb.StreamChatRequest(session_id=session_id, message=f"q{turn}"), metadata=chat.who
            )
        )

    async def all_six() -> None:
        page = await chat.stub.GetHistory(
            pb.GetHistoryRequest(session_id=session_id), metadata=chat.who
        )
        assert len(page.messages) == 6

    await assert_eventually(all_six)
    for order in (pb.HISTORY_ORDER_NEWEST_FIRST, pb.HISTORY_ORDER_OLDEST_FIRST):
        seen, token = [], ""
        while True:
            page = await chat.stub.GetHistory(
                pb.GetHistoryRequest(
                    session_id=session_id, page_size=4, page_token=token, order=order
                ),
                metadata=chat.who,
            )
            seen += [m.content for m in page.messages]
            token = page.next_page_token
            if not token:
                break
        expected = ["q0", "Hello, world!", "q1", "Hello, world!", "q2", "Hello, world!"]
        assert seen == (expected if order == pb.HISTORY_ORDER_OLDEST_FIRST else expected[::-1])
    other = identity(chat.who[0][1], "evilcorp")
    assert (
        await chat.stub.GetHistory(pb.GetHistoryRequest(session_id=session_id), metadata=other)
    ).messages == []
    with pytest.raises(aio.AioRpcError) as caught:
        await chat.stub.GetHistory(
            pb.GetHistoryRequest(session_id=session_id, page_token="x"), metadata=chat.who
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def drain(call, into: list[pb.StreamChatResponse]) -> None:
    async for event in call:
        into.append(event)


async def expect_error(
    chat: ChatStack, request: pb.StreamChatRequest, code: grpc.StatusCode
) -> tuple[list[pb.StreamChatResponse], aio.AioRpcError]:
    events: list[pb.StreamChatResponse] = []
    with pytest.raises(aio.AioRpcError) as caught:
        await drain(chat.stub.StreamChat(request, metadata=chat.who), events)
    assert caught.value.code() == code, caught.value.details()
    return events, caught.value


async def test_bad_requests_and_unknown_sessions_are_refused_precisely(chat) -> None:
    session_id = await new_session(chat)
    await expect_error(
        chat, pb.StreamChatRequest(session_id="nope", message="x"), grpc.StatusCode.INVALID_ARGUMENT
    )
    await expect_error(
        chat,
        pb.StreamChatRequest(session_id=session_id, message="  "),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    await expect_error(
        chat,
        pb.StreamChatRequest(session_id=session_id, message="x" * 40_000),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    await expect_error(
        chat,
        pb.StreamChatRequest(session_id=str(uuid.uuid4()), message="x"),
        grpc.StatusCode.NOT_FOUND,
    )
    _, error = await expect_error(
        chat,
        pb.StreamChatRequest(session_id=session_id, message="x", model="mistral:7b"),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert "ollama pull mistral:7b" in (error.details() or "")
    await expect_error(
        chat,
        pb.StreamChatRequest(
            session_id=session_id, message="x", options=pb.GenerationOptions(temperature=3)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert len(chat.ollama.requests) == 1, "only the unknown model reached the model server"


async def test_busy_model_server_is_retried_before_the_first_token_only(chat) -> None:
    session_id = await new_session(chat)
    chat.ollama.scenario = Scenario(refuse_next=[503, 429])
    events = await collect(
        chat.stub.StreamChat(
            pb.StreamChatRequest(session_id=session_id, message="x"), metadata=chat.who
        )
    )
    assert events[-1].completed.done_reason == pb.DONE_REASON_STOP
    assert len(chat.ollama.requests) == 3
    chat.ollama.scenario = Scenario(refuse_next=[503] * 10)
    _, error = await expect_error(
        chat,
        pb.StreamChatRequest(session_id=session_id, message="x"),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    assert "busy" in (error.details() or "")
    assert len(chat.ollama.requests) == 3 + 4, "one try and three retries"


@pytest.mark.parametrize(
    ("scenario", "code", "words"),
    [
        (
            Scenario(error_after=2),
            grpc.StatusCode.UNAVAILABLE,
            "failed mid-answer: an error was encountered",
        ),
        (Scenario(stall_after=2), grpc.StatusCode.DEADLINE_EXCEEDED, "stalled: no token for 2s"),
        (Scenario(truncate_after=2), grpc.StatusCode.UNAVAILABLE, "stream broke off mid-answer"),
    ],
    ids=["error-line", "stall", "truncated"],
)
async def test_failures_after_tokens_keep_the_partial_answer(chat, scenario, code, words) -> None:
    session_id = await new_session(chat)
    chat.ollama.scenario = scenario
    events, error = await expect_error(
        chat, pb.StreamChatRequest(session_id=session_id, message="x"), code
    )
    assert words in (error.details() or "")
    assert "".join(e.delta.content for e in events if e.HasField("delta")) == "Hello,"
    assert len(chat.ollama.requests) == 1, "never retried after tokens were sent"

    async def partial_stored() -> None:
        page = await chat.stub.GetHistory(
            pb.GetHistoryRequest(session_id=session_id), metadata=chat.who
        )
        assistant = [m for m in page.messages if m.role == pb.MESSAGE_ROLE_ASSISTANT]
        assert len(assistant) == 1
        assert assistant[0].incomplete
        assert assistant[0].content == "Hello,"
        assert words.split(":")[0] in assistant[0].metadata["error"]

    await assert_eventually(partial_stored)


async def test_unreachable_model_server_says_where_it_looked(
    session_runner, redis_server, history_dsn
) -> None:
    missing = f"http://127.0.0.1:{free_port()}"
    runner = await build_runner(
        chat_settings(session_runner, redis_server.url, history_dsn, missing, retries=1)
    )
    await runner.start()
    try:
        who = identity("lonely", "acme")
        async with (
            aio.insecure_channel(f"127.0.0.1:{session_runner.port}") as sc,
            aio.insecure_channel(f"127.0.0.1:{runner.port}") as cc,
        ):
            session = (
                await session_pb2_grpc.SessionServiceStub(sc).CreateSession(
                    session_pb2.CreateSessionRequest(), metadata=who
                )
            ).session
            stub = chat_pb2_grpc.ChatServiceStub(cc)
            with pytest.raises(aio.AioRpcError) as caught:
                await collect(
                    stub.StreamChat(
                        pb.StreamChatRequest(session_id=session.id, message="x"), metadata=who
                    )
                )
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert f"the model server at {missing} is unreachable" in (caught.value.details() or "")
            with pytest.raises(aio.AioRpcError) as caught:
                await stub.ListModels(pb.ListModelsRequest(), metadata=who)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await runner.stop()


@pytest.mark.parametrize("when", ["loading", "streaming"])
async def test_client_cancellation_closes_the_model_stream_within_500ms(chat, when) -> None:
    session_id = await new_session(chat)
    chat.ollama.scenario = (
        Scenario(load_seconds=30)
        if when == "loading"
        else Scenario(tokens=["t"] * 1000, seconds_per_token=0.05)
    )
    call = chat.stub.StreamChat(
        pb.StreamChatRequest(session_id=session_id, message="x"), metadata=chat.who
    )
    async for event in call:
        if when == "loading" and event.HasField("started"):
            break
        if when == "streaming" and event.HasField("delta"):
            break

    async def request_open() -> None:
        assert chat.ollama.requests

    await assert_eventually(request_open)
    cancelled_at = time.monotonic()
    call.cancel()

    async def hung_up() -> None:
        assert chat.ollama.requests[-1].hung_up is not None

    await assert_eventually(hung_up, timeout=5, interval=0.01)
    assert chat.ollama.requests[-1].hung_up - cancelled_at < 0.5
    assert not chat.ollama.requests[-1].finished


async def test_stop_generation_works_from_another_replica_and_only_for_the_owner(
    chat, session_runner, redis_server, history_dsn
) -> None:
    session_id = await new_session(chat)
    chat.ollama.scenario = Scenario(tokens=["t"] * 1000, seconds_per_token=0.02)
    # A second replica, sharing Redis: StopGeneration reaches the one that runs the stream.
    other = await build_runner(
        chat_settings(session_runner, redis_server.url, history_dsn, chat.ollama.url)
    )
    await other.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{other.port}") as channel:
            replica = chat_pb2_grpc.ChatServiceStub(channel)
            call = chat.stub.StreamChat(
                pb.StreamChatRequest(session_id=session_id, message="x"), metadata=chat.who
            )
            events = []
            async for event in call:
                events.append(event)
                if event.HasField("started"):
                    generation_id = event.started.generation_id
                    with pytest.raises(aio.AioRpcError) as caught:
                        await replica.StopGeneration(
                            pb.StopGenerationRequest(generation_id=generation_id),
                            metadata=identity("mallory", "acme"),
                        )
                    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
                if event.HasField("delta") and len(events) == 3:
                    stopped = await replica.StopGeneration(
                        pb.StopGenerationRequest(generation_id=generation_id), metadata=chat.who
                    )
                    assert stopped.stopped
    finally:
        await other.stop()
    completed = events[-1].completed
    assert completed.done_reason == pb.DONE_REASON_CANCELLED
    assert completed.incomplete

    async def hung_up() -> None:
        assert chat.ollama.requests[-1].hung_up is not None

    await assert_eventually(hung_up)
    again = await chat.stub.StopGeneration(
        pb.StopGenerationRequest(generation_id=generation_id), metadata=chat.who
    )
    assert not again.stopped


async def test_list_models_reflects_the_model_server(
    chat, session_runner, redis_server, history_dsn
) -> None:
    models = (await chat.stub.ListModels(pb.ListModelsRequest(), metadata=chat.who)).models
    assert {m.name: (m.allowed, m.is_default) for m in models} == {
        "llama3.2:3b": (True, True),
        "qwen2.5:7b": (True, False),
    }
    assert models[0].quantization_level == "Q4_K_M"
    assert models[0].modified_at.seconds > 0


async def test_decide_tool_call_has_nothing_to_decide_yet(chat) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await chat.stub.DecideToolCall(
            pb.DecideToolCallRequest(
                generation_id=str(uuid.uuid4()), tool_call_id="c1", approved=True
            ),
            metadata=chat.who,
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


class FlakyStore:
    """A history store whose inserts fail a number of times, as a ClickHouse that is away."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.rows: list[Message] = []

    async def insert(self, messages: list[Message]) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise DependencyUnavailable("clickhouse", "connection refused")
        self.rows += messages


def message(n: int) -> Message:
    from datetime import UTC, datetime

    return Message(
        message_id=str(uuid.uuid4()),
        session_id=str(uuid.uuid4()),
        user_id="u",
        org_id="o",
        role="user",
        content=f"m{n}",
        timestamp=datetime.now(UTC),
    )


async def test_history_writer_retries_while_clickhouse_is_away_and_never_drops_silently(
    caplog,
) -> None:
    store = FlakyStore(failures=3)
    writer = HistoryWriter(
        store, max_pending=5, batch_size=2, flush_interval=0.01, retry_interval=0.01
    )  # type: ignore[arg-type]
    writer.start()
    writer.add(*(message(n) for n in range(4)))
    writer.add(message(4), message(5))  # one over the bound: dropped, loudly

    async def written() -> None:
        assert len(store.rows) == 5

    await assert_eventually(written)
    assert writer.dropped == 1
    assert any("NOT stored" in r.getMessage() for r in caplog.records)
    writer.add(message(9))
    await writer.close()
    assert len(store.rows) == 6
    stuck = HistoryWriter(FlakyStore(failures=1000), retry_interval=0.01)  # type: ignore[arg-type]
    stuck.add(message(1))
    await stuck.close(within=0.1)
    assert any(
        "shutting down with 1 history messages NOT stored" in r.getMessage() for r in caplog.records
    )


async def test_history_shows_messages_still_waiting_for_their_batch_insert(
    session_runner: ServiceRunner, redis_server: RedisServer, history_dsn: str
) -> None:
    async with running_chat(
        session_runner, redis_server.url, history_dsn, history_flush_interval=60.0
    ) as stack:
        session_id = await new_session(stack)
        for turn in range(2):
            await collect(
                stack.stub.StreamChat(
                    pb.StreamChatRequest(session_id=session_id, message=f"q{turn}"),
                    metadata=stack.who,
                )
            )
        # Nothing is in ClickHouse yet (a minute to the next batch), and every page has it.
        seen, token = [], ""
        while True:
            page = await stack.stub.GetHistory(
                pb.GetHistoryRequest(
                    session_id=session_id,
                    page_size=3,
                    page_token=token,
                    order=pb.HISTORY_ORDER_OLDEST_FIRST,
                ),
                metadata=stack.who,
            )
            seen += [m.content for m in page.messages]
            if not (token := page.next_page_token):
                break
        assert seen == ["q0", "Hello, world!", "q1", "Hello, world!"]
        other = identity(stack.who[0][1], "evilcorp")
        assert (
            await stack.stub.GetHistory(pb.GetHistoryRequest(session_id=session_id), metadata=other)
        ).messages == []


async def test_a_full_redis_refuses_the_question_as_unavailable_and_leaves_nothing_running(
    session_runner: ServiceRunner, tmp_path, history_dsn: str
) -> None:
    # Chat's own Redis (the session service keeps the shared one): only chat's writes fail.
    redis = RedisServer(tmp_path / "chat-redis").start()
    admin = aioredis.from_url(redis.url)
    try:
        async with running_chat(session_runner, redis.url, history_dsn) as stack:
            session_id = await new_session(stack)
            await collect(
                stack.stub.StreamChat(
                    pb.StreamChatRequest(session_id=session_id, message="fits"), metadata=stack.who
                )
            )
            asked = len(stack.ollama.requests)
            await admin.config_set("maxmemory-policy", "noeviction")
            await admin.config_set("maxmemory", "1")  # every write is refused: OOM
            with pytest.raises(aio.AioRpcError) as caught:
                await collect(
                    stack.stub.StreamChat(
                        pb.StreamChatRequest(session_id=session_id, message="too much"),
                        metadata=stack.who,
                    )
                )
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "redis" in (caught.value.details() or "")
            assert len(stack.ollama.requests) == asked  # the model was never asked
            assert await admin.keys("opsmesh:chat:gen:*") == []
            await admin.config_set("maxmemory", "0")
            events = await collect(
                stack.stub.StreamChat(
                    pb.StreamChatRequest(session_id=session_id, message="again"),
                    metadata=stack.who,
                )
            )
            assert events[-1].HasField("completed")
    finally:
        await admin.aclose()
        redis.stop()


def test_a_history_page_merges_unwritten_messages_once_in_order() -> None:
    from datetime import UTC, datetime, timedelta

    start = datetime(2026, 1, 1, tzinfo=UTC)
    messages = [replace(message(n), timestamp=start + timedelta(milliseconds=n)) for n in range(6)]
    stored, unwritten = messages[:4], messages[3:]  # m3 is being written: in both
    newest = merged(stored[::-1][:3], unwritten, limit=3, newest_first=True, after=None)
    assert [m.content for m in newest] == ["m5", "m4", "m3"]
    cursor = (messages[4].timestamp, messages[4].message_id)
    older = merged(stored[::-1][1:], unwritten, limit=3, newest_first=True, after=cursor)
    assert [m.content for m in older] == ["m3", "m2", "m1"]
    cursor = (messages[2].timestamp, messages[2].message_id)
    newer = merged(stored[3:], unwritten, limit=10, newest_first=False, after=cursor)
    assert [m.content for m in newer] == ["m3", "m4", "m5"]


async def test_a_slow_reader_gets_coalesced_deltas_and_the_whole_answer(chat) -> None:
    session_id = await new_session(chat)
    # 300 tokens of 8 KiB: far more than the reader's HTTP/2 window (fixed at 64 KiB without
    # BDP probing), so the reader pushes back and the service coalesces what piles up.
    tokens = [f"{i:04d}" + "x" * 8188 for i in range(300)]
    chat.ollama.scenario = Scenario(tokens=tokens, seconds_per_token=0.001)
    deltas = []
    options = [("grpc.http2.bdp_probe", 0), ("grpc.max_receive_message_length", 8 * 1024 * 1024)]
    async with aio.insecure_channel(f"127.0.0.1:{chat.runner.port}", options=options) as channel:
        slow = chat_pb2_grpc.ChatServiceStub(channel)
        async for event in slow.StreamChat(
            pb.StreamChatRequest(session_id=session_id, message="x"), metadata=chat.who
        ):
            if event.HasField("delta"):
                deltas.append(event.delta)
                await asyncio.sleep(0.02)
    assert "".join(d.content for d in deltas) == "".join(tokens)
    assert sum(d.token_count for d in deltas) == 300
    assert len(deltas) < 150, f"{len(deltas)} deltas: the slow reader should get coalesced ones"


async def test_a_delta_interval_paces_deltas_but_not_the_first_token(
    session_runner: ServiceRunner, redis_server: RedisServer, history_dsn: str
) -> None:
    ollama = await OllamaStandIn().start()
    settings = chat_settings(session_runner, redis_server.url, history_dsn, ollama.url)
    runner = await build_runner(replace(settings, delta_interval=0.25), options=FAST_HEALTH)
    await runner.start()
    tokens = [f" t{i}" for i in range(20)]
    ollama.scenario = Scenario(tokens=tokens, seconds_per_token=0.02)
    who = identity(f"u{uuid.uuid4().hex[:8]}", "acme")
    try:
        async with (
            aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel,
            aio.insecure_channel(f"127.0.0.1:{session_runner.port}") as session_channel,
        ):
            stack = ChatStack(
                chat_pb2_grpc.ChatServiceStub(channel),
                session_pb2_grpc.SessionServiceStub(session_channel),
                ollama,
                runner,
                who,
            )
            request = pb.StreamChatRequest(session_id=await new_session(stack), message="x")
            deltas = [
                event.delta
                async for event in stack.stub.StreamChat(request, metadata=who)
                if event.HasField("delta")
            ]
    finally:
        await runner.stop()
        await ollama.stop()
    assert "".join(d.content for d in deltas) == "".join(tokens)
    assert deltas[0].token_count == 1  # the first token is not held back
    # 20 tokens over ~0.4 s in 0.25 s steps: a few messages, not one per token.
    assert len(deltas) <= 5, [d.token_count for d in deltas]
