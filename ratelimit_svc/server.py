"""Wires the rate limit service: settings → rules file, Redis → gRPC server."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from envoy.service.ratelimit.v3 import rls_pb2_grpc

from mesh.health import Probe
from mesh.logs import configure_service_logging
from mesh.redisconn import RedisSettings, connect_redis
from mesh.server import Registration, RunnerOptions, ServiceRunner, run_main
from mesh.settings import ServerSettings, choice, integer, load, nested, setting
from ratelimit_svc.edgeauth import edge_authenticator, edge_credential_setting
from ratelimit_svc.limits import DEFAULT_LOCAL_CACHE_SIZE, Limiter, load_rules
from ratelimit_svc.service import SERVICE_NAME, RateLimitService

DEFAULT_RULES = Path(__file__).resolve().parent / "ratelimits.toml"
"""The rules shipped as package data: an installed wheel runs without the repository."""


@dataclass(frozen=True, kw_only=True)
class RateLimitSettings:
    server: ServerSettings = nested(ServerSettings, port=50055, metrics_port=9155)
    redis: RedisSettings = nested(RedisSettings)
    rules: Path = setting("OPSMESH_RATELIMIT_RULES", DEFAULT_RULES, Path, doc="the packaged file")
    failure_mode: str = choice("OPSMESH_RATELIMIT_FAILURE_MODE", "open", ("open", "closed"))
    edge_credential: str = edge_credential_setting()
    """What Envoy must show (ratelimit_svc/edgeauth.py); empty: any caller."""
    local_cache_size: int = integer(
        "OPSMESH_RATELIMIT_LOCAL_CACHE_SIZE",
        DEFAULT_LOCAL_CACHE_SIZE,
        minimum=0,
        maximum=10_000_000,
    )
    """Over-limit keys remembered in-process until their window ends; 0 turns it off."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> RateLimitSettings:
        return load(cls, environ)

    def check(self, problems: list[str]) -> None:
        if not self.rules.is_file():
            problems.append(f"OPSMESH_RATELIMIT_RULES={str(self.rules)!r}: no such file")


def build_runner(
    settings: RateLimitSettings, *, options: RunnerOptions | None = None
) -> ServiceRunner:
    client = connect_redis(settings.redis)
    limiter = Limiter(
        client, load_rules(settings.rules), local_cache_size=settings.local_cache_size
    )
    service = RateLimitService(limiter, failure_mode=settings.failure_mode)
    base = options or RunnerOptions()
    return ServiceRunner(
        settings=settings.server,
        registrations=[
            Registration.of(
                SERVICE_NAME, service, rls_pb2_grpc.add_RateLimitServiceServicer_to_server
            )
        ],
        authenticator=edge_authenticator(settings.edge_credential),
        probes=[Probe(name="redis", check=client.ping)],
        options=base.extended(on_stop=(client.aclose,)),
    )


async def serve(environ: Mapping[str, str]) -> None:
    settings = RateLimitSettings.from_env(environ)
    configure_service_logging("ratelimit_svc", settings.server)
    await build_runner(settings).serve_until_signalled()


def main() -> None:
    run_main("ratelimit_svc", serve, RateLimitSettings)
