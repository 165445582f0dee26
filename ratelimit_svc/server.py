"""Wires the rate limit service: settings → rules file, Redis → gRPC server."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from envoy.service.ratelimit.v3 import rls_pb2_grpc

from mesh.context import Principal
from mesh.health import Probe
from mesh.logs import configure_service_logging
from mesh.redisconn import RedisSettings, connect_redis
from mesh.server import Registration, RunnerOptions, ServiceRunner, run_main
from mesh.settings import EnvReader, ServerSettings
from ratelimit_svc.limits import Limiter, load_rules
from ratelimit_svc.service import SERVICE_NAME, RateLimitService

DEFAULT_RULES = Path(__file__).resolve().parent.parent / "envoy" / "ratelimits.toml"


@dataclass(frozen=True, kw_only=True)
class RateLimitSettings:
    server: ServerSettings
    redis: RedisSettings
    rules: Path = DEFAULT_RULES
    failure_mode: str = "open"

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> RateLimitSettings:
        env = EnvReader(environ)
        rules = Path(env.string("OPSMESH_RATELIMIT_RULES", str(DEFAULT_RULES)))
        if not rules.is_file():
            env.problem(f"OPSMESH_RATELIMIT_RULES={str(rules)!r}: no such file")
        settings = cls(
            server=ServerSettings.from_env(env, default_port=50055, default_metrics_port=9155),
            redis=RedisSettings.from_env(env, default_url="redis://127.0.0.1:16379/0"),
            rules=rules,
            failure_mode=env.string(
                "OPSMESH_RATELIMIT_FAILURE_MODE", "open", choices=("open", "closed")
            ),
        )
        env.check()
        return settings


class _EnvoyOnly:
    """Only Envoy calls this service, from the mesh's private network; it carries no user.

    (NetworkPolicy admits Envoy alone; the call itself has no credentials to check.)
    """

    async def authenticate(self, metadata: Mapping[str, str], method: str) -> Principal:
        return Principal(user_id="envoy", org_id="mesh", roles=frozenset({"edge"}))


def build_runner(
    settings: RateLimitSettings, *, options: RunnerOptions | None = None
) -> ServiceRunner:
    client = connect_redis(settings.redis)
    service = RateLimitService(
        Limiter(client, load_rules(settings.rules)), failure_mode=settings.failure_mode
    )
    base = options or RunnerOptions()
    return ServiceRunner(
        settings=settings.server,
        registrations=[
            Registration.of(
                SERVICE_NAME, service, rls_pb2_grpc.add_RateLimitServiceServicer_to_server
            )
        ],
        authenticator=_EnvoyOnly(),
        probes=[Probe(name="redis", check=client.ping)],
        options=base.extended(on_stop=(client.aclose,)),
    )


async def serve(environ: Mapping[str, str]) -> None:
    settings = RateLimitSettings.from_env(environ)
    configure_service_logging("ratelimit_svc", settings.server)
    await build_runner(settings).serve_until_signalled()


def main() -> None:
    run_main("ratelimit_svc", serve)
