"""Wires the rate limit service: settings → rules file, Redis → gRPC server."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from envoy.service.ratelimit.v3 import rls_pb2_grpc

from mesh.health import Probe
from mesh.logs import configure_service_logging
from mesh.redisconn import DEFAULT_REDIS_URL, RedisSettings, connect_redis
from mesh.server import Registration, RunnerOptions, ServiceRunner, run_main
from mesh.settings import EnvReader, ServerSettings
from ratelimit_svc.edgeauth import edge_authenticator, edge_credential_from_env
from ratelimit_svc.limits import DEFAULT_LOCAL_CACHE_SIZE, Limiter, load_rules
from ratelimit_svc.service import SERVICE_NAME, RateLimitService

DEFAULT_RULES = Path(__file__).resolve().parent / "ratelimits.toml"
"""The rules shipped as package data: an installed wheel runs without the repository."""


@dataclass(frozen=True, kw_only=True)
class RateLimitSettings:
    server: ServerSettings
    redis: RedisSettings
    rules: Path = DEFAULT_RULES
    failure_mode: str = "open"
    edge_credential: str = ""
    """What Envoy must show (ratelimit_svc/edgeauth.py); empty: any caller."""
    local_cache_size: int = DEFAULT_LOCAL_CACHE_SIZE
    """Over-limit keys remembered in-process until their window ends; 0 turns it off."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> RateLimitSettings:
        env = EnvReader(environ)
        rules = Path(env.string("OPSMESH_RATELIMIT_RULES", str(DEFAULT_RULES)))
        if not rules.is_file():
            env.problem(f"OPSMESH_RATELIMIT_RULES={str(rules)!r}: no such file")
        settings = cls(
            server=ServerSettings.from_env(env, default_port=50055, default_metrics_port=9155),
            redis=RedisSettings.from_env(env, default_url=DEFAULT_REDIS_URL),
            rules=rules,
            failure_mode=env.string(
                "OPSMESH_RATELIMIT_FAILURE_MODE", "open", choices=("open", "closed")
            ),
            edge_credential=edge_credential_from_env(env),
            local_cache_size=env.integer(
                "OPSMESH_RATELIMIT_LOCAL_CACHE_SIZE",
                DEFAULT_LOCAL_CACHE_SIZE,
                minimum=0,
                maximum=10_000_000,
            ),
        )
        env.check()
        return settings


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
    run_main("ratelimit_svc", serve)
