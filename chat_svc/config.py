"""Chat service settings, read from OLLAMA_HOST and OPSMESH_* environment variables."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from chat_svc.agents.catalog import AgentLimits
from chat_svc.model import ModelSettings
from mesh.auth import AuthSettings
from mesh.redisconn import DEFAULT_REDIS_URL, RedisSettings
from mesh.settings import EnvReader, ServerSettings

DEFAULT_GRPC_PORT = 50052
DEFAULT_METRICS_PORT = 9152


@dataclass(frozen=True, kw_only=True)
class ChatSettings:
    server: ServerSettings
    model: ModelSettings
    redis: RedisSettings
    history_dsn: str
    """clickhouse-connect DSN: chdb://PATH (embedded) or http(s)://host:8123/db."""
    session_address: str = "127.0.0.1:50051"
    history_turns: int = 20
    """Earlier messages of the session given to the model with each new one."""
    recent_turns_ttl: float = 7 * 86400
    """How long a session's recent turns stay in Redis after its last message; older sessions'
    first prompt reads them from the history once."""
    max_message_chars: int = 32_000
    auth: AuthSettings = field(default_factory=AuthSettings)
    agent_limits: AgentLimits = field(default_factory=AgentLimits)
    task_address: str = ""
    """task_svc's gRPC address, for the operations agent; empty disables its tools."""
    prometheus_url: str = ""
    """Prometheus' HTTP API for the monitoring agent; empty disables its Prometheus tools."""
    alertmanager_url: str = ""
    """Alertmanager (v2 API) for the monitoring agent; empty disables its alert tools."""
    logs_source: str = ""
    """Where the troubleshooting agent reads logs: ``files://DIR`` (JSON log files) or a
    ClickHouse DSN (``chdb://PATH``, ``http(s)://...``) with the OpenTelemetry ``otel_logs``
    table; empty disables its log tools."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ChatSettings:
        env = EnvReader(environ)
        dsn = env.string("OPSMESH_HISTORY_DSN", "")
        if not dsn:
            env.problem(
                "OPSMESH_HISTORY_DSN is required: chdb://PATH (embedded) or a ClickHouse URL"
            )
        elif not dsn.startswith(
            ("chdb://", "http://", "https://", "clickhouse://", "clickhouses://")
        ):
            env.problem(f"OPSMESH_HISTORY_DSN={dsn!r}: expected chdb://PATH or a ClickHouse URL")
        settings = cls(
            server=ServerSettings.from_env(
                env, default_port=DEFAULT_GRPC_PORT, default_metrics_port=DEFAULT_METRICS_PORT
            ),
            model=ModelSettings.from_env(env),
            redis=RedisSettings.from_env(env, default_url=DEFAULT_REDIS_URL),
            history_dsn=dsn,
            session_address=env.string("OPSMESH_SESSION_ADDR", "127.0.0.1:50051"),
            history_turns=env.integer("OPSMESH_CHAT_HISTORY_TURNS", 20, minimum=0, maximum=500),
            recent_turns_ttl=env.seconds(
                "OPSMESH_CHAT_RECENT_TURNS_TTL", 7 * 86400, minimum=60, maximum=365 * 86400
            ),
            auth=AuthSettings.from_env(env),
            agent_limits=AgentLimits.from_env(env),
            task_address=env.string("OPSMESH_TASK_ADDR", ""),
            prometheus_url=env.string("OPSMESH_PROMETHEUS_URL", "").rstrip("/"),
            alertmanager_url=env.string("OPSMESH_ALERTMANAGER_URL", "").rstrip("/"),
            logs_source=env.string("OPSMESH_LOGS_SOURCE", ""),
        )
        logs = settings.logs_source
        if logs.startswith("chdb://") and logs.split("?")[0] != dsn.split("?")[0]:
            # chDB runs one engine on one path per process.
            env.problem(
                f"OPSMESH_LOGS_SOURCE={logs!r}: an embedded chDB log source must be the history's "
                f"own path ({dsn!r})"
            )
        if logs and not logs.startswith(
            ("files://", "chdb://", "http://", "https://", "clickhouse://", "clickhouses://")
        ):
            env.problem(f"OPSMESH_LOGS_SOURCE={logs!r}: expected files://DIR or a ClickHouse DSN")
        env.check()
        return settings
