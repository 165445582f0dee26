"""Task service and worker settings, read from OPSMESH_* environment variables."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from mesh.auth import AuthSettings
from mesh.clients import ServiceClientSettings
from mesh.natsconn import NatsSettings
from mesh.redisconn import RedisSettings
from mesh.settings import (
    ServerSettings,
    integer,
    load,
    nested,
    seconds,
    setting,
    string,
)
from opsmesh.task.v1 import task_pb2
from task_svc.workspace import KubeSettings

DEFAULT_GRPC_PORT = 50054
DEFAULT_METRICS_PORT = 9154
DEFAULT_WORKER_GRPC_PORT = 50056
DEFAULT_WORKER_METRICS_PORT = 9156


def _namespace(raw: str) -> str:
    if not raw.replace("_", "").isalnum():
        raise ValueError("expected letters, digits and _")
    return raw


@dataclass(frozen=True, kw_only=True)
class Topology:
    """Names of the JetStream objects; a namespace keeps deployments (and tests) apart."""

    namespace: str = setting("OPSMESH_TASK_NAMESPACE", "opsmesh", _namespace)
    retention: float = seconds(
        "OPSMESH_TASK_RETENTION", 30 * 86400.0, minimum=3600, maximum=3650 * 86400
    )
    """Seconds a task record is kept after its last change (the bucket's max age)."""
    replicas: int = integer("OPSMESH_TASK_REPLICAS", 1, minimum=1, maximum=5)
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
class RetrySettings(Mapping[int, RetryPolicy]):
    """How often and how patiently each task type is retried: the policies by task type."""

    backoff_base: float = seconds("OPSMESH_TASK_BACKOFF_BASE", 1.0, minimum=0, maximum=3600)
    backoff_cap: float = seconds("OPSMESH_TASK_BACKOFF_CAP", 300.0, minimum=0, maximum=86400)
    max_attempts_workspace: int = integer(
        "OPSMESH_TASK_MAX_ATTEMPTS_WORKSPACE", 5, minimum=1, maximum=100
    )
    max_attempts_email: int = integer("OPSMESH_TASK_MAX_ATTEMPTS_EMAIL", 8, minimum=1, maximum=100)

    @property
    def _policies(self) -> dict[int, RetryPolicy]:
        attempts = {
            task_pb2.TASK_TYPE_WORKSPACE: self.max_attempts_workspace,
            task_pb2.TASK_TYPE_EMAIL: self.max_attempts_email,
        }
        return {
            task_type: RetryPolicy(
                max_attempts=count, backoff_base=self.backoff_base, backoff_cap=self.backoff_cap
            )
            for task_type, count in attempts.items()
        }

    def __getitem__(self, task_type: int) -> RetryPolicy:
        return self._policies[task_type]

    def __iter__(self) -> Iterator[int]:
        return iter(self._policies)

    def __len__(self) -> int:
        return len(self._policies)


@dataclass(frozen=True, kw_only=True)
class TaskSettings:
    server: ServerSettings = nested(
        ServerSettings, port=DEFAULT_GRPC_PORT, metrics_port=DEFAULT_METRICS_PORT
    )
    nats: NatsSettings = nested(NatsSettings)
    topology: Topology = nested(Topology)
    retry: Mapping[int, RetryPolicy] = nested(RetrySettings)
    auth: AuthSettings = nested(AuthSettings)
    revocations: RedisSettings = nested(RedisSettings)
    """Where the revocation feed is read without OPSMESH_REVOCATION_FEED_URL (jwt mode):
    OPSMESH_REDIS_URL, the task service keeps nothing of its own in Redis."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> TaskSettings:
        return load(cls, environ)


def _worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True, kw_only=True)
class WorkerSettings:
    server: ServerSettings = nested(
        ServerSettings,
        port=DEFAULT_WORKER_GRPC_PORT,
        metrics_port=DEFAULT_WORKER_METRICS_PORT,
        grace_period=20.0,
    )
    """Health and metrics; grace_period is how long running tasks get to finish on SIGTERM."""
    nats: NatsSettings = nested(NatsSettings)
    topology: Topology = nested(Topology)
    retry: Mapping[int, RetryPolicy] = nested(RetrySettings)
    worker_id: str = string(
        "OPSMESH_WORKER_ID", default_factory=_worker_id, doc="empty: <hostname>-<pid>"
    )
    kube: KubeSettings = nested(KubeSettings)
    """The cluster workspace tasks run against; an empty API URL: no cluster."""
    notify_address: str = string("OPSMESH_NOTIFY_ADDR", doc="empty: email tasks fail")
    """The notification service, which delivers email tasks; empty: none."""
    service_client: ServiceClientSettings = nested(ServiceClientSettings)
    """The worker's own OAuth client: with it the worker calls other services with its own
    credentials instead of identity headers."""
    concurrency: int = integer("OPSMESH_WORKER_CONCURRENCY", 8, minimum=1, maximum=1024)
    ack_wait: float = seconds("OPSMESH_WORKER_ACK_WAIT", 30.0, minimum=1, maximum=3600)
    """Seconds before JetStream redelivers an unacknowledged task; heartbeats extend it."""
    lease_ttl: float = seconds("OPSMESH_TASK_LEASE_TTL", 30.0, minimum=0.3, maximum=3600)
    """Seconds a running attempt's lease lasts without renewal; a crashed worker's tasks are
    taken over once it has passed (renewed every third of min(lease_ttl, ack_wait))."""
    reap_interval: float = seconds("OPSMESH_TASK_REAP_INTERVAL", 10.0, minimum=0.1, maximum=3600)
    """Seconds between the reaper's passes over open tasks (stale leases, unpublished tasks,
    queue depth)."""
    outbox_grace: float = seconds("OPSMESH_TASK_OUTBOX_GRACE", 10.0, minimum=0.1, maximum=60)
    """Seconds a task may stay recorded but unpublished before the reaper publishes it."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> WorkerSettings:
        return load(cls, environ)
