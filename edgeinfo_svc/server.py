"""Wires the edge info service: reflection and health for everything behind the edge.

Why a process of its own: Envoy routes by path and cannot merge the answers of several
backends, so ``grpcurl list`` through the edge needs one server that knows every public
contract, and ``Health/Check`` with a service name needs one server that knows where each
service runs. Putting that in session_svc (which used to answer health at the edge) would
couple it to every other service's address and replace its own health, which ``make up`` and
Kubernetes probes rely on. This one is stateless and depends on nothing but the generated
descriptors and the services' addresses; if it is down, only reflection and health through
the edge are (health then answers UNAVAILABLE: not healthy, as it should).

Envoy routes ``/grpc.reflection.v1.ServerReflection/``, ``/grpc.reflection.v1alpha...`` (behind
a JWT, like the APIs) and ``/grpc.health.v1.Health/`` (public, for load balancers) here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from grpc_health.v1 import health_pb2

from edgeinfo_svc.health import EdgeHealth
from mesh.context import Principal
from mesh.errors import Unauthenticated
from mesh.logs import configure_service_logging
from mesh.server import RunnerOptions, ServiceRunner, run_main
from mesh.settings import ServerSettings, fixed, load, nested, seconds, string
from opsmesh.chat.v1 import chat_pb2
from opsmesh.identity.v1 import identity_pb2, organization_pb2
from opsmesh.notify.v1 import notify_pb2
from opsmesh.session.v1 import session_pb2
from opsmesh.task.v1 import task_pb2

# Every service a client may call through the edge (importing the modules puts their
# descriptors in the default pool, which reflection answers from). Internal ones (the rate
# limit service, the worker's health) are not listed. NotificationService's worker-only
# DeliverNotification is part of its contract and listed with it.
IDENTITY = identity_pb2.DESCRIPTOR.services_by_name["IdentityService"].full_name
ORGANIZATIONS = organization_pb2.DESCRIPTOR.services_by_name["OrganizationService"].full_name
SESSION = session_pb2.DESCRIPTOR.services_by_name["SessionService"].full_name
CHAT = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name
TASK = task_pb2.DESCRIPTOR.services_by_name["TaskService"].full_name
NOTIFY = notify_pb2.DESCRIPTOR.services_by_name["NotificationService"].full_name
PUBLIC_SERVICES = (IDENTITY, ORGANIZATIONS, SESSION, CHAT, TASK, NOTIFY)
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


@dataclass(frozen=True, kw_only=True)
class EdgeInfoSettings:
    server: ServerSettings = nested(ServerSettings, port=50057, metrics_port=9157)
    identity_address: str = string("OPSMESH_IDENTITY_ADDR", "127.0.0.1:50058")
    session_address: str = string("OPSMESH_SESSION_ADDR", "127.0.0.1:50051")
    chat_address: str = string("OPSMESH_CHAT_ADDR", "127.0.0.1:50052")
    notify_address: str = string("OPSMESH_NOTIFY_ADDR", "127.0.0.1:50053")
    task_address: str = string("OPSMESH_TASK_ADDR", "127.0.0.1:50054")
    health_timeout: float = seconds("OPSMESH_EDGE_HEALTH_TIMEOUT", 1.0, minimum=0.05, maximum=30)
    """Deadline of one forwarded health check."""
    watch_interval: float = fixed(1.0, why="tests watch faster")

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> EdgeInfoSettings:
        return load(cls, environ)

    @property
    def backends(self) -> dict[str, str]:
        """Public service name → address of its gRPC server (``host:port``)."""
        return {
            IDENTITY: self.identity_address,
            # Served by the same identity_svc process as IdentityService.
            ORGANIZATIONS: self.identity_address,
            SESSION: self.session_address,
            CHAT: self.chat_address,
            NOTIFY: self.notify_address,
            TASK: self.task_address,
        }


class _NoCalls:
    """Health and reflection are public (mesh.auth); nothing else is served here."""

    async def authenticate(self, metadata: Mapping[str, str], method: str) -> Principal:
        raise Unauthenticated(f"{method} is not served here")


def build_runner(
    settings: EdgeInfoSettings, *, options: RunnerOptions | None = None
) -> ServiceRunner:
    health = EdgeHealth(
        settings.backends,
        timeout=settings.health_timeout,
        watch_interval=settings.watch_interval,
    )
    base = options or RunnerOptions()
    return ServiceRunner(
        settings=settings.server,
        registrations=[],
        authenticator=_NoCalls(),
        health=health,
        reflected=(*PUBLIC_SERVICES, HEALTH),
        options=base.extended(on_stop=(health.close,)),
    )


async def serve(environ: Mapping[str, str]) -> None:
    settings = EdgeInfoSettings.from_env(environ)
    configure_service_logging("edgeinfo_svc", settings.server)
    await build_runner(settings).serve_until_signalled()


def main() -> None:
    run_main("edgeinfo_svc", serve, EdgeInfoSettings)
