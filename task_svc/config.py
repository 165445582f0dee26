"""Task service and worker settings, read from OPSMESH_* environment variables."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

from mesh.auth import AuthSettings
from mesh.natsconn import DEFAULT_NATS_URL, NatsSettings
from mesh.redisconn import DEFAULT_REDIS_URL, RedisSettings
from mesh.settings import EnvReader, ServerSettings
from opsmesh.task.v1 import task_pb2
from task_svc.workspace import KubeSettings

DEFAULT_GRPC_PORT = 50054
DEFAULT_METRICS_PORT = 9154
DEFAULT_WORKER_METRICS_PORT = 9156


@dataclass(frozen=True, kw_only=True)
class Topology:
    """Names of the JetStream objects; a namespace keeps deployments (and tests) apart."""

    namespace: str = "opsmesh"
    retention: float = 30 * 86400.0
    """Seconds a task record is kept after its last change (the bucket's max age)."""
    replicas: int = 1
    """Copies of the work stream and the records bucket in a NATS cluster (3 in production)."""

    @property
    def stream(self) -> str:
        return f"{self.namespace}_task_work"

    @property
    def bucket(self) -> str:
        return f"{self.namespace}_tasks"

    def subject(self, task_type: int) -> str:
        return f"{self.namespace}.tasks.work.{TYPE_NAMES[task_type]}"

    def consumer(self, task_type: int) -> str:
        return f"{self.namespace}_worker_{TYPE_NAMES[task_type]}"


TYPE_NAMES: dict[int, str] = {
    task_pb2.TASK_TYPE_WORKSPACE: "workspace",
    task_pb2.TASK_TYPE_EMAIL: "email",
}


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    max_attempts: int
    backoff_base: float = 1.0
    """Delay before the first retry, in seconds; doubled each attempt (full jitter)."""
    backoff_cap: float = 300.0


@dataclass(frozen=True, kw_only=True)
class TaskSettings:
    server: ServerSettings
    nats: NatsSettings
    topology: Topology
    retry: Mapping[int, RetryPolicy]
    auth: AuthSettings = field(default_factory=AuthSettings)
    revocations: RedisSettings | None = None
    """Where the revocation feed is read without OPSMESH_REVOCATION_FEED_URL (jwt mode):
    OPSMESH_REDIS_URL, the task service keeps nothing of its own in Redis."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> TaskSettings:
        env = EnvReader(environ)
        settings = cls(
            server=ServerSettings.from_env(
                env, default_port=DEFAULT_GRPC_PORT, default_metrics_port=DEFAULT_METRICS_PORT
            ),
            nats=NatsSettings.from_env(env, default_url=DEFAULT_NATS_URL),
            topology=_topology(env),
            retry=_retry_policies(env),
            auth=AuthSettings.from_env(env),
            revocations=RedisSettings.from_env(env, default_url=DEFAULT_REDIS_URL),
        )
        env.check()
        return settings


@dataclass(frozen=True, kw_only=True)
class WorkerSettings:
    nats: NatsSettings
    topology: Topology
    retry: Mapping[int, RetryPolicy]
    worker_id: str
    kube: KubeSettings | None = None
    """The cluster workspace tasks run against; None (or an empty API URL): no cluster."""
    notify_address: str = ""
    """The notification service, which delivers email tasks; empty: none."""
    service_token_url: str = ""
    """The issuer's token endpoint; with a client id and secret the worker calls other
    services with its own credentials instead of identity headers."""
    service_client_id: str = ""
    service_client_secret: str = ""
    concurrency: int = 8
    ack_wait: float = 30.0
    """Seconds before JetStream redelivers an unacknowledged task; heartbeats extend it."""
    lease_ttl: float = 30.0
    """Seconds a running attempt's lease lasts without renewal; a crashed worker's tasks are
    taken over once it has passed (renewed every third of min(lease_ttl, ack_wait))."""
    reap_interval: float = 10.0
    """Seconds between the reaper's passes over open tasks (stale leases, unpublished tasks,
    queue depth)."""
    outbox_grace: float = 10.0
    """Seconds a task may stay recorded but unpublished before the reaper publishes it."""
    grace_period: float = 20.0
    metrics_port: int = 0
    host: str = "127.0.0.1"
    log_level: str = "INFO"
    log_format: str = "json"

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> WorkerSettings:
        env = EnvReader(environ)
        settings = cls(
            nats=NatsSettings.from_env(env, default_url=DEFAULT_NATS_URL),
            topology=_topology(env),
            retry=_retry_policies(env),
            worker_id=env.string("OPSMESH_WORKER_ID", f"{socket.gethostname()}-{os.getpid()}"),
            kube=KubeSettings.from_env(env),
            notify_address=env.string("OPSMESH_NOTIFY_ADDR", ""),
            service_token_url=env.string("OPSMESH_SERVICE_TOKEN_URL", ""),
            service_client_id=env.string("OPSMESH_SERVICE_CLIENT_ID", ""),
            service_client_secret=env.string("OPSMESH_SERVICE_CLIENT_SECRET", ""),
            concurrency=env.integer("OPSMESH_WORKER_CONCURRENCY", 8, minimum=1, maximum=1024),
            ack_wait=env.seconds("OPSMESH_WORKER_ACK_WAIT", 30.0, minimum=1, maximum=3600),
            lease_ttl=env.seconds("OPSMESH_TASK_LEASE_TTL", 30.0, minimum=0.3, maximum=3600),
            reap_interval=env.seconds(
                "OPSMESH_TASK_REAP_INTERVAL", 10.0, minimum=0.1, maximum=3600
            ),
            outbox_grace=env.seconds("OPSMESH_TASK_OUTBOX_GRACE", 10.0, minimum=0.1, maximum=60),
            grace_period=env.seconds("OPSMESH_GRACE_PERIOD", 20.0, minimum=0, maximum=3600),
            metrics_port=env.integer(
                "OPSMESH_METRICS_PORT", DEFAULT_WORKER_METRICS_PORT, minimum=0, maximum=65535
            ),
            host=env.string("OPSMESH_HOST", "127.0.0.1"),
            log_level=env.string(
                "OPSMESH_LOG_LEVEL", "INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR")
            ),
            log_format=env.string("OPSMESH_LOG_FORMAT", "json", choices=("json", "text")),
        )
        env.check()
        return settings


def _topology(env: EnvReader) -> Topology:
    namespace = env.string("OPSMESH_TASK_NAMESPACE", "opsmesh")
    if not namespace.replace("_", "").isalnum():
        env.problem(f"OPSMESH_TASK_NAMESPACE={namespace!r}: expected letters, digits and _")
    retention = env.seconds(
        "OPSMESH_TASK_RETENTION", 30 * 86400.0, minimum=3600, maximum=3650 * 86400
    )
    replicas = env.integer("OPSMESH_TASK_REPLICAS", 1, minimum=1, maximum=5)
    return Topology(namespace=namespace, retention=retention, replicas=replicas)


def _retry_policies(env: EnvReader) -> dict[int, RetryPolicy]:
    base = env.seconds("OPSMESH_TASK_BACKOFF_BASE", 1.0, minimum=0, maximum=3600)
    cap = env.seconds("OPSMESH_TASK_BACKOFF_CAP", 300.0, minimum=0, maximum=86400)
    defaults = {task_pb2.TASK_TYPE_WORKSPACE: 5, task_pb2.TASK_TYPE_EMAIL: 8}
    return {
        task_type: RetryPolicy(
            max_attempts=env.integer(
                f"OPSMESH_TASK_MAX_ATTEMPTS_{TYPE_NAMES[task_type].upper()}",
                default,
                minimum=1,
                maximum=100,
            ),
            backoff_base=base,
            backoff_cap=cap,
        )
        for task_type, default in defaults.items()
    }
