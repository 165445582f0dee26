"""Wires the task service: settings → NATS (JetStream stream + bucket) → gRPC server."""

from __future__ import annotations

import functools
from collections.abc import Mapping

from mesh.auth import Authenticator, authenticator_for
from mesh.health import Probe
from mesh.logs import configure_service_logging
from mesh.natsconn import close_nats, connect_nats
from mesh.revocations import RevocationFeed
from mesh.server import Registration, RunnerOptions, ServiceRunner, run_main
from opsmesh.task.v1 import task_pb2_grpc
from task_svc.config import TaskSettings
from task_svc.queue import Publisher
from task_svc.service import SERVICE_NAME, TaskService
from task_svc.store import TaskStore


async def build_runner(
    settings: TaskSettings,
    *,
    authenticator: Authenticator | None = None,
    options: RunnerOptions | None = None,
) -> ServiceRunner:
    """A ready-to-start server; connects to NATS and declares the stream and bucket first."""
    client = await connect_nats(settings.nats, name="task_svc")
    js = client.jetstream(timeout=settings.nats.request_timeout)
    store = await TaskStore.open(
        client, js, settings.topology, request_timeout=settings.nats.request_timeout
    )
    publisher = Publisher(js, settings.topology, timeout=settings.nats.request_timeout)
    service = TaskService(store, publisher, dict(settings.retry))
    # Tokens of revoked sessions are refused before they expire (jwt mode only).
    revocations = (
        RevocationFeed.open(settings.auth.revocation_feed_url, default=settings.revocations)
        if settings.auth.mode == "jwt" and settings.revocations is not None
        else None
    )

    async def jetstream_answers() -> None:
        await js.account_info()

    base = options or RunnerOptions()
    return ServiceRunner(
        settings=settings.server,
        registrations=[
            Registration.of(SERVICE_NAME, service, task_pb2_grpc.add_TaskServiceServicer_to_server)
        ],
        authenticator=authenticator or authenticator_for(settings.auth, revocations=revocations),
        probes=[Probe(name="nats", check=jetstream_answers)],
        options=base.extended(
            on_stop=(
                functools.partial(close_nats, client),
                *((revocations.aclose,) if revocations is not None else ()),
            ),
        ),
    )


async def serve(environ: Mapping[str, str]) -> None:
    settings = TaskSettings.from_env(environ)
    configure_service_logging("task_svc", settings.server)
    runner = await build_runner(settings)
    await runner.serve_until_signalled()


def main() -> None:
    run_main("task_svc", serve, TaskSettings)
