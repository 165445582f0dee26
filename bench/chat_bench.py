"""Time to first token and token throughput: Ollama directly vs through chat_svc, in one run.

The Ollama stand-in (tests/ollama_standin.py, its own process) emits a fixed
number of tokens at a fixed rate. The same load runs twice at 1, 50 and 200
concurrent streams: straight to the stand-in with the official ollama client,
then through the real chat_svc process (gRPC StreamChat: session lookup,
history, Redis stop registration, history writes). Prints TTFT p50/p99 for
both, the TTFT chat_svc adds, and the delivered tokens/s ratio.
Targets: added TTFT <= 2 ms p50 and <= 10 ms p99 at 200 streams; tokens/s >= 0.9x direct.

    .venv/bin/python bench/chat_bench.py [--tokens 50] [--seconds-per-token 0.02]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import ollama
import uvloop
from grpc import aio
from measure import percentile as pct

from devtools.servers import ManagedProcess, RedisServer, free_port
from mesh.auth import ORG_HEADER, USER_HEADER
from opsmesh.chat.v1 import chat_pb2, chat_pb2_grpc
from opsmesh.session.v1 import session_pb2, session_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
METADATA = ((USER_HEADER, "bench"), (ORG_HEADER, "bench-org"))
LEVELS = (1, 50, 200)


async def direct(url: str, streams: int) -> tuple[list[float], int, float]:
    client = ollama.AsyncClient(host=url)
    ttfts: list[float] = []
    tokens = 0

    async def one() -> None:
        nonlocal tokens
        began = time.perf_counter()
        first = True
        parts = await client.chat(
            model="llama3.2:3b", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        async for part in parts:
            if part.message.content:
                if first:
                    ttfts.append((time.perf_counter() - began) * 1000)
                    first = False
                tokens += 1

    began = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(streams)))
    elapsed = time.perf_counter() - began
    return ttfts, tokens, elapsed


async def through_chat(
    stub: chat_pb2_grpc.ChatServiceStub, session_ids: list[str]
) -> tuple[list[float], int, float]:
    ttfts: list[float] = []
    tokens = 0

    async def one(session_id: str) -> None:
        nonlocal tokens
        began = time.perf_counter()
        first = True
        request = chat_pb2.StreamChatRequest(session_id=session_id, message="hi")
        async for event in stub.StreamChat(request, metadata=METADATA):
            if event.HasField("delta"):
                if first:
                    ttfts.append((time.perf_counter() - began) * 1000)
                    first = False
                tokens += event.delta.token_count

    began = time.perf_counter()
    await asyncio.gather(*(one(s) for s in session_ids))
    elapsed = time.perf_counter() - began
    return ttfts, tokens, elapsed


async def run(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="chat-bench-"))
    redis = RedisServer(workdir / "redis").start()
    standin_port, session_port, chat_port = free_port(), free_port(), free_port()
    base_env = dict(
        os.environ,
        OPSMESH_REDIS_URL=redis.url,
        OPSMESH_METRICS_PORT="0",
        OPSMESH_SESSION_HTTP_PORT="0",
        OPSMESH_JWT_KEYS_DIR=str(workdir / "keys"),
        OPSMESH_LOG_LEVEL="INFO",
        OPSMESH_SESSION_MAX_PER_USER="10000",
    )
    standin = ManagedProcess(
        "ollama-standin",
        [
            sys.executable,
            "-m",
            "tests.ollama_standin",
            "--port",
            str(standin_port),
            "--tokens",
            str(args.tokens),
            "--seconds-per-token",
            str(args.seconds_per_token),
        ],
        log_path=workdir / "standin.log",
        ready=re.compile("stand-in listening"),
        env=dict(base_env, PYTHONPATH=str(ROOT)),
    )
    session = ManagedProcess(
        "session_svc",
        [sys.executable, "-m", "session_svc"],
        log_path=workdir / "session.log",
        ready=re.compile("serving opsmesh"),
        env=dict(base_env, OPSMESH_GRPC_PORT=str(session_port)),
    )
    chat = ManagedProcess(
        "chat_svc",
        [sys.executable, "-m", "chat_svc"],
        log_path=workdir / "chat.log",
        ready=re.compile("serving opsmesh"),
        env=dict(
            base_env,
            OPSMESH_GRPC_PORT=str(chat_port),
            OLLAMA_HOST=f"http://127.0.0.1:{standin_port}",
            OPSMESH_SESSION_ADDR=f"127.0.0.1:{session_port}",
            OPSMESH_HISTORY_DSN=f"chdb://{workdir / 'history'}",
        ),
    )
    for process in (standin, session, chat):
        process.start(timeout=60)
    url = f"http://127.0.0.1:{standin_port}"
    print(
        f"chat bench: {args.tokens} tokens per answer at "
        f"{args.seconds_per_token * 1000:g} ms/token\n"
    )
    print(
        f"{'streams':>8}  {'direct TTFT p50/p99 ms':>24}  {'chat_svc TTFT p50/p99 ms':>26}"
        f"  {'added p50/p99':>14}  {'tokens/s direct':>15}  {'via chat':>9}  {'ratio':>6}"
    )
    verdict = True
    try:
        async with (
            aio.insecure_channel(f"127.0.0.1:{chat_port}") as chat_channel,
            aio.insecure_channel(f"127.0.0.1:{session_port}") as session_channel,
        ):
            chat_stub = chat_pb2_grpc.ChatServiceStub(chat_channel)
            sessions = session_pb2_grpc.SessionServiceStub(session_channel)
            await direct(url, 1)  # warm-up
            warm = (
                await sessions.CreateSession(session_pb2.CreateSessionRequest(), metadata=METADATA)
            ).session.id
            await through_chat(chat_stub, [warm])
            for streams in LEVELS:
                ids = [
                    (
                        await sessions.CreateSession(
                            session_pb2.CreateSessionRequest(), metadata=METADATA
                        )
                    ).session.id
                    for _ in range(streams)
                ]
                d_ttft, d_tokens, d_elapsed = await direct(url, streams)
                c_ttft, c_tokens, c_elapsed = await through_chat(chat_stub, ids)
                added50 = pct(c_ttft, 0.5) - pct(d_ttft, 0.5)
                added99 = pct(c_ttft, 0.99) - pct(d_ttft, 0.99)
                d_rate, c_rate = d_tokens / d_elapsed, c_tokens / c_elapsed
                print(
                    f"{streams:>8}  {pct(d_ttft, 0.5):>11.1f} /{pct(d_ttft, 0.99):>10.1f}  "
                    f"{pct(c_ttft, 0.5):>12.1f} /{pct(c_ttft, 0.99):>11.1f}  "
                    f"{added50:>6.1f} /{added99:>6.1f}  {d_rate:>15.0f}  {c_rate:>9.0f}  "
                    f"{c_rate / d_rate:>5.2f}x"
                )
                if streams == 200:
                    verdict = added50 <= 2 and added99 <= 10 and c_rate / d_rate >= 0.9
    finally:
        for process in (chat, session, standin):
            process.stop()
        redis.stop()
    print(
        "\ntargets at 200 streams (added TTFT <= 2 ms p50, <= 10 ms p99; tokens/s >= 0.9x): "
        + ("met" if verdict else "NOT met")
    )
    return 0 if verdict else 1


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=50)
    parser.add_argument("--seconds-per-token", type=float, default=0.02)
    raise SystemExit(uvloop.run(run(parser.parse_args())))


if __name__ == "__main__":
    main()
