"""The chat integration tests that make sense against a real Ollama, when one is reachable.

Set OPSMESH_TEST_OLLAMA_HOST (e.g. http://gpu-box:11434) and OPSMESH_TEST_OLLAMA_MODEL (a
model it has pulled, default llama3.2:3b); without them these tests are skipped.
"""

from __future__ import annotations

import os
import time
import uuid

import pytest
from grpc import aio

from chat_svc.server import build_runner
from opsmesh.chat.v1 import chat_pb2 as pb
from opsmesh.chat.v1 import chat_pb2_grpc
from opsmesh.session.v1 import session_pb2, session_pb2_grpc
from tests.helpers import identity
from tests.test_chat import chat_settings

HOST = os.environ.get("OPSMESH_TEST_OLLAMA_HOST", "")
MODEL = os.environ.get("OPSMESH_TEST_OLLAMA_MODEL", "llama3.2:3b")

pytestmark = pytest.mark.skipif(
    not HOST,
    reason="no real Ollama: set OPSMESH_TEST_OLLAMA_HOST (and OPSMESH_TEST_OLLAMA_MODEL) to run",
)


async def test_real_model_streams_an_answer_and_stops_on_cancel(
    session_runner, redis_server, history_dsn
) -> None:
    runner = await build_runner(
        chat_settings(session_runner, redis_server.url, history_dsn, HOST, default=MODEL)
    )
    await runner.start()
    who = identity(f"real{uuid.uuid4().hex[:6]}", "acme")
    try:
        async with (
            aio.insecure_channel(f"127.0.0.1:{runner.port}") as cc,
            aio.insecure_channel(f"127.0.0.1:{session_runner.port}") as sc,
        ):
            stub = chat_pb2_grpc.ChatServiceStub(cc)
            session = (
                await session_pb2_grpc.SessionServiceStub(sc).CreateSession(
                    session_pb2.CreateSessionRequest(), metadata=who
                )
            ).session
            models = {
                m.name for m in (await stub.ListModels(pb.ListModelsRequest(), metadata=who)).models
            }
            assert MODEL in models
            request = pb.StreamChatRequest(
                session_id=session.id,
                message="Say hello in five words.",
                options=pb.GenerationOptions(max_tokens=32, seed=1, temperature=0),
            )
            events = [e async for e in stub.StreamChat(request, metadata=who)]
            assert events[-1].completed.usage.completion_tokens > 0
            assert "".join(e.delta.content for e in events if e.HasField("delta")).strip()
            call = stub.StreamChat(
                pb.StreamChatRequest(session_id=session.id, message="Count to one thousand."),
                metadata=who,
            )
            async for event in call:
                if event.HasField("delta"):
                    break
            began = time.monotonic()
            call.cancel()
            assert time.monotonic() - began < 0.5
    finally:
        await runner.stop()
