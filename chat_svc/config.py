"""Chat service settings, read from OLLAMA_HOST and OPSMESH_* environment variables."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from chat_svc.agents.catalog import AgentLimits
from chat_svc.model import ModelSettings
from mesh.auth import AuthSettings
from mesh.redisconn import RedisSettings
from mesh.settings import (
    ServerSettings,
    fixed,
    integer,
    load,
    nested,
    required,
    seconds,
    setting,
    string,
)

DEFAULT_GRPC_PORT = 50052
DEFAULT_METRICS_PORT = 9152


_CLICKHOUSE = ("http://", "https://", "clickhouse://", "clickhouses://")


def _history_dsn(raw: str) -> str:
    if not raw.startswith(("chdb://", *_CLICKHOUSE)):
        raise ValueError("expected chdb://PATH or a ClickHouse URL")
    return raw


def _logs_source(raw: str) -> str:
    if not raw.startswith(("files://", "chdb://", *_CLICKHOUSE)):
        raise ValueError("expected files://DIR or a ClickHouse DSN")
    return raw


def _base_url(raw: str) -> str:
    return raw.rstrip("/")


@dataclass(frozen=True, kw_only=True)
class ChatSettings:
    server: ServerSettings = nested(
        ServerSettings, port=DEFAULT_GRPC_PORT, metrics_port=DEFAULT_METRICS_PORT
    )
    model: ModelSettings = nested(ModelSettings)
    redis: RedisSettings = nested(RedisSettings)
    history_dsn: str = required(
        "OPSMESH_HISTORY_DSN", _history_dsn, doc="chdb://PATH (embedded) or a ClickHouse URL"
    )
    """clickhouse-connect DSN: chdb://PATH (embedded) or http(s)://host:8123/db."""
    history_flush_interval: float = seconds(
        "OPSMESH_HISTORY_FLUSH_INTERVAL", 1.0, minimum=0.05, maximum=60
    )
    """Longest wait of a history message for its batch insert (reads see it meanwhile)."""
    session_address: str = string("OPSMESH_SESSION_ADDR", "127.0.0.1:50051")
    history_turns: int = integer("OPSMESH_CHAT_HISTORY_TURNS", 20, minimum=0, maximum=500)
    """Earlier messages of the session given to the model with each new one."""
    recent_turns_ttl: float = seconds(
        "OPSMESH_CHAT_RECENT_TURNS_TTL", 7 * 86400.0, minimum=60, maximum=365 * 86400
    )
    """How long a session's recent turns stay in Redis after its last message; older sessions'
    first prompt reads them from the history once."""
    max_message_chars: int = fixed(32_000, why="the contract's limit, not a deployment's")
    delta_interval: float = seconds("OPSMESH_CHAT_DELTA_INTERVAL", 0.0, minimum=0, maximum=1)
    """Shortest time between two text deltas of one answer after the first; tokens that arrive
    meanwhile share one message. 0 (the default) sends whatever is ready at once, the lowest
    latency per token; under heavy load 40ms halves the messages (docs/operations.md)."""
    auth: AuthSettings = nested(AuthSettings)
    agent_limits: AgentLimits = nested(AgentLimits)
    task_address: str = string("OPSMESH_TASK_ADDR", doc="empty disables the operations tools")
    """task_svc's gRPC address, for the operations agent; empty disables its tools."""
    prometheus_url: str = setting("OPSMESH_PROMETHEUS_URL", "", _base_url)
    """Prometheus' HTTP API for the monitoring agent; empty disables its Prometheus tools."""
    alertmanager_url: str = setting("OPSMESH_ALERTMANAGER_URL", "", _base_url)
    """Alertmanager (v2 API) for the monitoring agent; empty disables its alert tools."""
    logs_source: str = setting("OPSMESH_LOGS_SOURCE", "", _logs_source)
    """Where the troubleshooting agent reads logs: ``files://DIR`` (JSON log files) or a
    ClickHouse DSN (``chdb://PATH``, ``http(s)://...``) with the OpenTelemetry ``otel_logs``
    table; empty disables its log tools."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ChatSettings:
        return load(cls, environ)

    def check(self, problems: list[str]) -> None:
        logs, dsn = self.logs_source, self.history_dsn
        if logs.startswith("chdb://") and logs.split("?")[0] != dsn.split("?")[0]:
            # chDB runs one engine on one path per process.
            problems.append(
                f"OPSMESH_LOGS_SOURCE={logs!r}: an embedded chDB log source must be the history's "
                f"own path ({dsn!r})"
            )
