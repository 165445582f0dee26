"""Wires the chat service: settings → Ollama, ClickHouse history, Redis, sessions → gRPC."""

from __future__ import annotations

from collections.abc import Mapping

from grpc import aio

from chat_svc.agents.catalog import Agent
from chat_svc.agents.wiring import AgentDependencies
from chat_svc.approvals import Approvals
from chat_svc.config import ChatSettings
from chat_svc.history import HistoryStore, HistoryWriter
from chat_svc.model import ModelServer
from chat_svc.recent import RecentTurns
from chat_svc.service import SERVICE_NAME, ChatService
from chat_svc.stops import StopSignals
from chat_svc.turns import Turns
from mesh.auth import Authenticator, authenticator_for
from mesh.health import Probe
from mesh.logs import configure_service_logging
from mesh.redisconn import connect_redis
from mesh.revocations import RevocationFeed
from mesh.server import Registration, RunnerOptions, ServiceRunner, run_main
from opsmesh.chat.v1 import chat_pb2_grpc
from opsmesh.session.v1 import session_pb2_grpc


async def build_runner(
    settings: ChatSettings,
    *,
    authenticator: Authenticator | None = None,
    options: RunnerOptions | None = None,
    agents: Mapping[int, Agent] | None = None,
) -> ServiceRunner:
    """A ready-to-start server; migrates the history schema first."""
    history = HistoryStore(settings.history_dsn)
    await history.migrate()
    writer = HistoryWriter(history, flush_interval=settings.history_flush_interval)
    models = ModelServer(settings.model)
    redis = connect_redis(settings.redis)
    revocations = RevocationFeed.open(settings.auth.revocation_feed_url, default=redis)
    stops = StopSignals(redis)
    recent = RecentTurns(redis, keep=max(1, settings.history_turns), ttl=settings.recent_turns_ttl)
    session_channel = aio.insecure_channel(settings.session_address)
    dependencies = AgentDependencies.open(settings)
    service = ChatService(
        settings=settings,
        models=models,
        history=history,
        writer=writer,
        redis=redis,
        stops=stops,
        sessions=session_pb2_grpc.SessionServiceStub(session_channel),
        approvals=Approvals(redis, stops),
        turns=Turns(redis),
        recent=recent,
        agents=agents or dependencies.agents,
    )

    async def started() -> None:
        writer.start()
        stops.start()
        await recent.start()

    async def close_channels() -> None:
        await session_channel.close(None)
        await dependencies.close()

    base = options or RunnerOptions()
    return ServiceRunner(
        settings=settings.server,
        registrations=[
            Registration.of(SERVICE_NAME, service, chat_pb2_grpc.add_ChatServiceServicer_to_server)
        ],
        authenticator=authenticator or authenticator_for(settings.auth, revocations=revocations),
        # Ollama being away is reported per request (UNAVAILABLE with what is missing), not as
        # NOT_SERVING: history, models listing errors and stop still work without it.
        probes=[Probe(name="redis", check=redis.ping), Probe(name="history", check=history.ping)],
        options=base.extended(
            on_start=(started,),
            on_stop=(
                service.close,
                stops.close,
                writer.close,
                models.close,
                close_channels,
                revocations.aclose,
                redis.aclose,
                history.close,
            ),
        ),
    )


async def serve(environ: Mapping[str, str]) -> None:
    settings = ChatSettings.from_env(environ)
    configure_service_logging("chat_svc", settings.server)
    runner = await build_runner(settings)
    await runner.serve_until_signalled()


def main() -> None:
    run_main("chat_svc", serve, ChatSettings)
