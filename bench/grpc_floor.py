"""The floor under chat_svc's per-token cost: a bare grpc.aio server streaming the same events.

It answers StreamChat with Started, one TokenDelta per token at the stand-in's rate and
Completed, doing nothing else (no model call, no Redis, no history), so its CPU per streamed
message is what grpc.aio itself costs on this machine. chat_bench.py runs it beside chat_svc.

    python bench/grpc_floor.py --port P [--tokens 50] [--seconds-per-token 0.02]
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator

import uvloop
from grpc import aio

from opsmesh.chat.v1 import chat_pb2, chat_pb2_grpc


class FloorChat(chat_pb2_grpc.ChatServiceServicer):
    def __init__(self, tokens: int, seconds_per_token: float) -> None:
        self._tokens = tokens
        self._pause = seconds_per_token

    async def StreamChat(
        self, request: chat_pb2.StreamChatRequest, context: aio.ServicerContext
    ) -> AsyncIterator[chat_pb2.StreamChatResponse]:
        limit = request.options.max_tokens if request.options.HasField("max_tokens") else 0
        count = min(self._tokens, limit) if limit else self._tokens
        yield chat_pb2.StreamChatResponse(sequence=1, started=chat_pb2.Started(model="floor"))
        for index in range(count):
            yield chat_pb2.StreamChatResponse(
                sequence=index + 2,
                delta=chat_pb2.TokenDelta(content=f" t{index}", token_count=1),
            )
            await asyncio.sleep(self._pause)
        yield chat_pb2.StreamChatResponse(
            sequence=count + 2, completed=chat_pb2.Completed(done_reason=chat_pb2.DONE_REASON_STOP)
        )


async def serve(port: int, tokens: int, seconds_per_token: float) -> None:
    server = aio.server()
    chat_pb2_grpc.add_ChatServiceServicer_to_server(FloorChat(tokens, seconds_per_token), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"grpc floor listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens", type=int, default=50)
    parser.add_argument("--seconds-per-token", type=float, default=0.02)
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.tokens, args.seconds_per_token))


if __name__ == "__main__":
    main()
