"""The cost of one tool round: model asks for a tool → the tool runs → its result back to the model.

Measured at the model server (the Ollama stand-in, in this process): from the
moment it wrote the final line of an answer that calls a tool to the moment the
next request (carrying the tool's result) arrived, minus the tool's own time.
The same round runs twice, one at a time:

- baseline: a bare loop with the official ollama client that runs the same tool
  work itself (task_svc's ListTasks over gRPC) and sends the result back;
- opsmesh: chat_svc's operations agent (a real process), which validates the
  call against the tool's schema, streams ToolCall/ToolResult events to the
  client and builds the next request; the tool's time is ToolResult.duration.

Prints p50/p99 of both, the time the mesh adds, and the ratio.

    .venv/bin/python bench/agent_bench.py [--rounds 200]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ollama
import uvloop
from grpc import aio
from measure import percentile as pct

from devtools.servers import ManagedProcess, NatsServer, RedisServer, free_port
from mesh.auth import ORG_HEADER, USER_HEADER
from opsmesh.chat.v1 import chat_pb2, chat_pb2_grpc
from opsmesh.session.v1 import session_pb2, session_pb2_grpc
from opsmesh.task.v1 import task_pb2, task_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the Ollama stand-in lives with the tests
from tests.ollama_standin import OllamaStandIn, Reply  # noqa: E402

METADATA = ((USER_HEADER, "bench"), (ORG_HEADER, "bench-org"))


def model(body: dict[str, Any]) -> Reply:
    if body["messages"][-1]["role"] == "tool":
        return Reply(tokens=["done"])
    return Reply(tool_calls=[("list_tasks", {"limit": 5})])


def gap(standin: OllamaStandIn) -> float:
    """Seconds from the tool-calling answer's last line to the next request's arrival."""
    asked, answered = standin.requests[-2], standin.requests[-1]
    assert asked.finished_at is not None
    return answered.arrived - asked.finished_at


async def baseline(standin: OllamaStandIn, tasks: task_pb2_grpc.TaskServiceStub) -> float:
    client = ollama.AsyncClient(host=standin.url)
    messages: list[dict[str, Any]] = [{"role": "user", "content": "list my tasks"}]
    calls: list[Any] = []
    async for part in await client.chat(model="llama3.2:3b", messages=messages, stream=True):
        calls.extend(part.message.tool_calls or [])
    began = time.perf_counter()
    reply = await tasks.ListTasks(task_pb2.ListTasksRequest(page_size=5), metadata=METADATA)
    tool_seconds = time.perf_counter() - began
    messages += [
        {"role": "assistant", "content": "", "tool_calls": [{"function": dict(calls[0].function)}]},
        {"role": "tool", "content": str(len(reply.tasks)), "tool_name": "list_tasks"},
    ]
    async for _ in await client.chat(model="llama3.2:3b", messages=messages, stream=True):
        pass
    await client._client.aclose()
    return gap(standin) - tool_seconds


async def through_agent(
    standin: OllamaStandIn, chat: chat_pb2_grpc.ChatServiceStub, session_id: str
) -> float:
    request = chat_pb2.StreamChatRequest(
        session_id=session_id, message="list my tasks", agent=chat_pb2.AGENT_OPERATIONS
    )
    tool_seconds = 0.0
    async for event in chat.StreamChat(request, metadata=METADATA):
        if event.HasField("tool_result"):
            tool_seconds = event.tool_result.duration.ToNanoseconds() / 1e9
    return gap(standin) - tool_seconds


async def run(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="agent-bench-"))
    redis = RedisServer(workdir / "redis").start()
    nats = NatsServer(workdir / "nats").start()
    standin = await OllamaStandIn().start()
    standin.scenario.responder = model
    session_port, task_port, chat_port = free_port(), free_port(), free_port()
    env = dict(
        os.environ,
        OPSMESH_REDIS_URL=redis.url,
        OPSMESH_NATS_URL=nats.url,
        OPSMESH_METRICS_PORT="0",
        OPSMESH_JWT_KEYS_DIR=str(workdir / "keys"),
        OPSMESH_LOG_LEVEL="WARNING",
    )
    processes = [
        ManagedProcess(
            "session_svc",
            [sys.executable, "-m", "session_svc"],
            log_path=workdir / "session.log",
            ready=re.compile("serving opsmesh"),
            env=dict(env, OPSMESH_GRPC_PORT=str(session_port), OPSMESH_LOG_LEVEL="INFO"),
        ),
        ManagedProcess(
            "task_svc",
            [sys.executable, "-m", "task_svc"],
            log_path=workdir / "task.log",
            ready=re.compile("serving opsmesh"),
            env=dict(env, OPSMESH_GRPC_PORT=str(task_port), OPSMESH_LOG_LEVEL="INFO"),
        ),
        ManagedProcess(
            "chat_svc",
            [sys.executable, "-m", "chat_svc"],
            log_path=workdir / "chat.log",
            ready=re.compile("serving opsmesh"),
            env=dict(
                env,
                OPSMESH_GRPC_PORT=str(chat_port),
                OPSMESH_LOG_LEVEL="INFO",
                OLLAMA_HOST=standin.url,
                OPSMESH_SESSION_ADDR=f"127.0.0.1:{session_port}",
                OPSMESH_TASK_ADDR=f"127.0.0.1:{task_port}",
                OPSMESH_HISTORY_DSN=f"chdb://{workdir / 'history'}",
                OPSMESH_CHAT_HISTORY_TURNS="0",
            ),
        ),
    ]
    try:
        for process in processes:
            process.start(timeout=60)
        async with (
            aio.insecure_channel(f"127.0.0.1:{chat_port}") as chat_channel,
            aio.insecure_channel(f"127.0.0.1:{session_port}") as session_channel,
            aio.insecure_channel(f"127.0.0.1:{task_port}") as task_channel,
        ):
            chat = chat_pb2_grpc.ChatServiceStub(chat_channel)
            tasks = task_pb2_grpc.TaskServiceStub(task_channel)
            sessions = session_pb2_grpc.SessionServiceStub(session_channel)
            session_id = (
                await sessions.CreateSession(session_pb2.CreateSessionRequest(), metadata=METADATA)
            ).session.id
            for _ in range(20):  # warm-up: connections, imports, caches
                await baseline(standin, tasks)
                await through_agent(standin, chat, session_id)
            bare: list[float] = []
            mesh: list[float] = []
            for _ in range(args.rounds):
                bare.append(await baseline(standin, tasks) * 1000)
                mesh.append(await through_agent(standin, chat, session_id) * 1000)
    finally:
        for process in reversed(processes):
            process.stop()
        await standin.stop()
        nats.stop()
        redis.stop()
    print(f"tool round overhead, {args.rounds} rounds each, tool time excluded (ms)")
    print(f"{'':>10}  {'p50':>7}  {'p99':>7}")
    print(f"{'baseline':>10}  {pct(bare, 0.5):>7.2f}  {pct(bare, 0.99):>7.2f}")
    print(f"{'opsmesh':>10}  {pct(mesh, 0.5):>7.2f}  {pct(mesh, 0.99):>7.2f}")
    added50, added99 = pct(mesh, 0.5) - pct(bare, 0.5), pct(mesh, 0.99) - pct(bare, 0.99)
    print(
        f"added by the agent loop: {added50:+.2f} ms p50, {added99:+.2f} ms p99; "
        f"ratio {pct(mesh, 0.5) / pct(bare, 0.5):.2f}x p50"
    )
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=200)
    raise SystemExit(uvloop.run(run(parser.parse_args())))


if __name__ == "__main__":
    main()
