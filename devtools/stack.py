"""The local dev stack behind ``make up``, ``make restart``, ``make down`` and ``make status``.

Starts Redis, NATS (JetStream) and every service that exists, detached, on the
default ports of docs/architecture.md (never Redis' 6379 or NATS' 4222, which a machine
may already run), waits until each is ready (services: gRPC health SERVING),
and records what it started in ``<run dir>/stack.json`` (0600: command lines and
environments hold the stack's secrets) so ``down`` stops exactly that and
``restart``/``up`` start a dead component again exactly as it was. Ports and the
run folder can be overridden by environment.

What each part trusts (docs/security.md): Redis and NATS require the passwords
generated into the run folder; every service verifies access tokens itself
(revoked sessions from the identity service's revocation feed); the worker calls with its own client
credentials; ratelimit_svc answers only the edge's credential; everything binds
loopback, Envoy's listener too unless OPSMESH_BIND_ADDRESS says otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import ipaddress
import json
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devtools.edge import DEFAULT_PORTS, EdgeTopology, envoy_process, render
from devtools.servers import (
    MESH_RULES,
    AlertmanagerServer,
    ManagedProcess,
    NatsServer,
    PrometheusServer,
    RedisServer,
    ScrapeTarget,
    ServerStartError,
    free_port,
    pid_alive,
    render_alertmanager_config,
    render_prometheus_config,
)


@dataclass(frozen=True, kw_only=True)
class ServiceSpec:
    """A Python service of the stack: its module, its ports and its start-up line."""

    name: str
    module: str
    grpc_port: int
    metrics_port: int
    ready: str


# (name, module, gRPC port, metrics port, log line that says it serves), from docs/architecture.md.
SERVICES = (
    # First: the issuer of every token, whose JWKS and token endpoint the others call.
    (
        "identity_svc",
        "identity_svc",
        50058,
        9158,
        r"serving opsmesh\.identity\.v1\.IdentityService",
    ),
    ("session_svc", "session_svc", 50051, 9151, r"serving opsmesh\.session\.v1\.SessionService"),
    ("chat_svc", "chat_svc", 50052, 9152, r"serving opsmesh\.chat\.v1\.ChatService"),
    ("task_svc", "task_svc", 50054, 9154, r"serving opsmesh\.task\.v1\.TaskService"),
    ("notify_svc", "notify_svc", 50053, 9153, r"serving opsmesh\.notify\.v1\.NotificationService"),
    ("ratelimit_svc", "ratelimit_svc", 50055, 9155, r"serving envoy\.service\.ratelimit"),
    ("task_worker", "task_svc.worker", 50056, 9156, r"worker \S+ consuming"),
    # Last: its health ("" = every public service SERVING) is what the edge answers.
    ("edgeinfo_svc", "edgeinfo_svc", 50057, 9157, r"serving health and reflection"),
)


FIXED_PORTS = (
    "REDIS",
    "NATS",
    "SMTP",
    "WEBHOOK",
    "IDENTITY_HTTP",
    "EDGE",
    "EDGE_ADMIN",
    "WEB",
    "PROMETHEUS",
    "ALERTMANAGER",
)
DEV_ALERT_ORG = "dev"
DEV_ALERT_EMAILS = "oncall@example.com"
"""Where the dev stack's alerts go (the mail sink catches them: make mail)."""
NATS_USER = "opsmesh"
WORKER_CLIENT = "task-worker"
"""The worker's OAuth client (client credentials), as in the Kubernetes manifests."""
NOTIFY_CLIENT = "notify"
"""notify_svc's OAuth client: it queues deliveries (also for webhooks, which bring no token)."""
LOOPBACK_PROXIES = "127.0.0.1/32,::1/128"
"""identity_svc believes X-Forwarded-For only from these: Envoy runs on this host."""


def port_variable(service: str, what: str = "") -> str:
    """The variable that moves a service's gRPC (what="") or metrics (what="METRICS_") port."""
    return f"OPSMESH_DEV_{service.removesuffix('_svc').upper()}_{what}PORT"


def free_ports_environment() -> dict[str, str]:
    """OPSMESH_DEV_*_PORT set to a free port for every port the stack opens (tests, benches)."""
    names = [f"OPSMESH_DEV_{name}_PORT" for name in FIXED_PORTS]
    for service, *_ in SERVICES:
        names += [port_variable(service), port_variable(service, "METRICS_")]
    return {name: str(free_port()) for name in names}


@dataclass(frozen=True, kw_only=True)
class StackConfig:
    run_dir: Path
    redis_port: int = 16379
    nats_port: int = 14222
    smtp_port: int = 2525
    webhook_port: int = 8093
    identity_http_port: int = 8090
    """identity_svc's HTTP side: OAuth, sign-in page, JWKS (the edge routes /oauth/ here)."""
    edge_port: int = 8080
    edge_admin_port: int = 9901
    web_port: int = 8095
    prometheus_port: int = 19090
    alertmanager_port: int = 19093
    ui_dev_port: int = 5173
    """``make ui-dev``'s Vite server (not started by ``up``; CORS and OAuth allow it)."""
    bind_address: str = "127.0.0.1"
    """Where Envoy's listener binds (OPSMESH_BIND_ADDRESS); everything else is loopback."""
    web_root: Path = Path("ui/dist")
    services: tuple[ServiceSpec, ...] = ()

    @property
    def public_url(self) -> str:
        """Where a browser reaches the stack (the edge); also the tokens' issuer."""
        return f"http://localhost:{self.edge_port}"

    def port_of(self, name: str) -> int:
        return next(spec.grpc_port for spec in self.services if spec.name == name)

    @property
    def mail_dir(self) -> Path:
        return self.run_dir / "mail"

    @property
    def ui_dev_origin(self) -> str:
        return f"http://localhost:{self.ui_dev_port}"

    @property
    def alert_token_file(self) -> Path:
        """notify_svc's Alertmanager webhook token (OPSMESH_ALERT_WEBHOOK_TOKEN)."""
        return self.run_dir / "alert-webhook-token"

    @classmethod
    def from_env(cls, environ: Mapping[str, str], root: Path) -> StackConfig:
        def port(name: str, default: int) -> int:
            raw = environ.get(name, "")
            if not raw:
                return default
            if not raw.isdigit() or not 0 < int(raw) < 65536:
                raise SystemExit(f"{name}={raw!r}: expected a port number")
            return int(raw)

        return cls(
            run_dir=Path(environ.get("OPSMESH_RUN_DIR") or root / ".run"),
            redis_port=port("OPSMESH_DEV_REDIS_PORT", 16379),
            nats_port=port("OPSMESH_DEV_NATS_PORT", 14222),
            smtp_port=port("OPSMESH_DEV_SMTP_PORT", 2525),
            webhook_port=port("OPSMESH_DEV_WEBHOOK_PORT", 8093),
            identity_http_port=port("OPSMESH_DEV_IDENTITY_HTTP_PORT", 8090),
            edge_port=port("OPSMESH_DEV_EDGE_PORT", 8080),
            edge_admin_port=port("OPSMESH_DEV_EDGE_ADMIN_PORT", 9901),
            web_port=port("OPSMESH_DEV_WEB_PORT", 8095),
            prometheus_port=port("OPSMESH_DEV_PROMETHEUS_PORT", 19090),
            alertmanager_port=port("OPSMESH_DEV_ALERTMANAGER_PORT", 19093),
            ui_dev_port=port("OPSMESH_DEV_UI_PORT", 5173),
            bind_address=_bind_address(environ.get("OPSMESH_BIND_ADDRESS", "")),
            web_root=Path(environ.get("OPSMESH_WEB_ROOT") or root / "ui" / "dist"),
            services=tuple(
                ServiceSpec(
                    name=name,
                    module=module,
                    grpc_port=port(port_variable(name), grpc_port),
                    metrics_port=port(port_variable(name, "METRICS_"), metrics_port),
                    ready=ready,
                )
                for name, module, grpc_port, metrics_port, ready in SERVICES
            ),
        )

    @property
    def state_file(self) -> Path:
        return self.run_dir / "stack.json"


def _bind_address(raw: str) -> str:
    """OPSMESH_BIND_ADDRESS, an IP address (default loopback: nothing else on the network)."""
    if not raw:
        return "127.0.0.1"
    try:
        return str(ipaddress.ip_address(raw))
    except ValueError:
        raise SystemExit(f"OPSMESH_BIND_ADDRESS={raw!r}: expected an IP address") from None


@dataclass(frozen=True)
class Component:
    """A process of the stack and exactly how it was started (to start it again the same)."""

    name: str
    pid: int
    address: str
    log: str
    grpc_port: int = 0
    argv: tuple[str, ...] = ()
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    ready: str = ""
    """The log line that says it is up (ManagedProcess)."""

    @classmethod
    def of(cls, process: ManagedProcess, address: str, *, grpc_port: int = 0) -> Component:
        """The record of a started process (env None: it inherited ours, which is kept)."""
        return cls(
            name=process.name,
            pid=process.pid,
            address=address,
            log=str(process.log_path),
            grpc_port=grpc_port,
            argv=tuple(process.argv),
            env=process.env if process.env is not None else dict(os.environ),
            ready=process.ready.pattern,
        )

    def process(self) -> ManagedProcess:
        """A new process with this one's command line, environment, log and ready line."""
        return ManagedProcess(
            self.name,
            self.argv,
            log_path=Path(self.log),
            ready=re.compile(self.ready),
            env=self.env,
            detach=True,
        )


def _load(config: StackConfig) -> list[Component]:
    if not config.state_file.exists():
        return []
    entries = json.loads(config.state_file.read_text())
    return [Component(**entry | {"argv": tuple(entry.get("argv", ()))}) for entry in entries]


def _save(config: StackConfig, components: Sequence[Component]) -> None:
    config.run_dir.mkdir(parents=True, exist_ok=True)
    config.state_file.touch(mode=0o600)
    config.state_file.chmod(0o600)
    config.state_file.write_text(json.dumps([dataclasses.asdict(c) for c in components], indent=2))


def _port_taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


def health_status(port: int, service: str = "", timeout: float = 1.0) -> str:
    """The grpc.health.v1 status of a server on localhost, or why it has none."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as error:
            return f"unreachable ({error.code().name})"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def _wait_serving(component: Component, process: ManagedProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    status = "unknown"
    while time.monotonic() < deadline:
        if not process.running():
            raise ServerStartError(component.name, "exited during start-up")
        status = health_status(component.grpc_port)
        if status == "SERVING":
            return
        time.sleep(0.1)
    raise ServerStartError(component.name, f"health is {status} after {timeout:g}s")


def _secret(config: StackConfig, name: str) -> str:
    """A random secret of the stack, made once and kept (0600) in the run folder."""
    path = config.run_dir / name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(24))
    path.chmod(0o600)
    return path.read_text().strip()


def redis_url(config: StackConfig) -> str:
    return f"redis://:{_secret(config, 'redis-password')}@127.0.0.1:{config.redis_port}/0"


def nats_url(config: StackConfig) -> str:
    return f"nats://{NATS_USER}:{_secret(config, 'nats-password')}@127.0.0.1:{config.nats_port}"


def _service_env(config: StackConfig, port: int, metrics_port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        # Services listen on loopback only: Envoy (on this host) is the way in.
        OPSMESH_HOST="127.0.0.1",
        OPSMESH_GRPC_PORT=str(port),
        OPSMESH_METRICS_PORT=str(metrics_port),
        OPSMESH_REDIS_URL=redis_url(config),
        OPSMESH_NATS_URL=nats_url(config),
        OPSMESH_SMTP_HOST="127.0.0.1",
        OPSMESH_SMTP_PORT=str(config.smtp_port),
        OPSMESH_WEBHOOK_PORT=str(config.webhook_port),
        OPSMESH_IDENTITY_HTTP_PORT=str(config.identity_http_port),
        OPSMESH_JWT_KEYS_DIR=str(config.run_dir / "keys"),
        OPSMESH_JWT_ISSUER=config.public_url,
        OPSMESH_JWKS_URL=f"http://127.0.0.1:{config.identity_http_port}/.well-known/jwks.json",
        # Revoked sessions, as identity_svc publishes them (mesh/revocations.py): here on the
        # one Redis of the stack; the feed's schema, not the instance, is the contract.
        OPSMESH_REVOCATION_FEED_URL=redis_url(config),
        # Every service verifies the caller's token itself (roles, revoked sessions), as in
        # the Kubernetes manifests: identity headers from a host process prove nothing.
        OPSMESH_AUTH_MODE="jwt",
        OPSMESH_OAUTH_CLIENTS=(
            f"opsmesh-web={config.public_url}/oauth/callback,{config.ui_dev_origin}/oauth/callback"
        ),
        OPSMESH_TASK_ADDR=f"127.0.0.1:{config.port_of('task_svc')}",
        OPSMESH_NOTIFY_ADDR=f"127.0.0.1:{config.port_of('notify_svc')}",
        OPSMESH_IDENTITY_ADDR=f"127.0.0.1:{config.port_of('identity_svc')}",
        OPSMESH_SESSION_ADDR=f"127.0.0.1:{config.port_of('session_svc')}",
        OPSMESH_CHAT_ADDR=f"127.0.0.1:{config.port_of('chat_svc')}",
        OPSMESH_PROMETHEUS_URL=f"http://127.0.0.1:{config.prometheus_port}",
        OPSMESH_ALERTMANAGER_URL=f"http://127.0.0.1:{config.alertmanager_port}",
        # The troubleshooting agent reads the services' own JSON logs of this stack.
        OPSMESH_LOGS_SOURCE=f"files://{config.run_dir / 'logs'}",
        OPSMESH_ALERT_WEBHOOK_TOKEN=_alert_token(config),
        OPSMESH_ALERT_ORG=os.environ.get("OPSMESH_ALERT_ORG", DEV_ALERT_ORG),
        OPSMESH_ALERT_EMAILS=os.environ.get("OPSMESH_ALERT_EMAILS", DEV_ALERT_EMAILS),
        OPSMESH_HISTORY_DSN=os.environ.get(
            "OPSMESH_HISTORY_DSN", f"chdb://{config.run_dir / 'chat-history'}"
        ),
    )
    return env


def service_secrets(config: StackConfig, name: str) -> dict[str, str]:
    """What one service alone is given: its client secret, the edge's credential."""
    clients = {
        "task_worker": (WORKER_CLIENT, _secret(config, "worker-client-secret")),
        "notify_svc": (NOTIFY_CLIENT, _secret(config, "notify-client-secret")),
    }
    if name == "identity_svc":
        return {
            "OPSMESH_SERVICE_CLIENTS": ";".join(f"{c}={secret}" for c, secret in clients.values()),
            "OPSMESH_TRUSTED_PROXIES": LOOPBACK_PROXIES,
        }
    if name in clients:
        client, secret = clients[name]
        return {
            "OPSMESH_SERVICE_TOKEN_URL": f"http://127.0.0.1:{config.identity_http_port}/oauth/token",
            "OPSMESH_SERVICE_CLIENT_ID": client,
            "OPSMESH_SERVICE_CLIENT_SECRET": secret,
        }
    if name == "ratelimit_svc":
        return {"OPSMESH_RATELIMIT_EDGE_CREDENTIAL": edge_credential(config)}
    return {}


def edge_credential(config: StackConfig) -> str:
    """What Envoy shows ratelimit_svc (ratelimit_svc/edgeauth.py)."""
    return _secret(config, "ratelimit-edge-credential")


def up(config: StackConfig) -> int:
    """Starts the stack; with one already recorded, starts again what of it is dead."""
    recorded = _load(config)
    if any(pid_alive(c.pid) for c in recorded):
        return _revive(config, recorded)
    taken = _ports_in_use(config)
    if taken:
        print(
            f"cannot start: {', '.join(taken)} already in use by another program "
            "(set OPSMESH_DEV_*_PORT to move it)",
            file=sys.stderr,
        )
        return 1
    started: list[Component] = []
    try:
        for step in START_STEPS:
            step(config, started)
    except ServerStartError as error:
        print(f"make up failed: {error}", file=sys.stderr)
        _stop(started)
        config.state_file.unlink(missing_ok=True)
        return 1
    _welcome(config, started)
    return 0


def _revive(config: StackConfig, recorded: list[Component]) -> int:
    dead = [c for c in recorded if not pid_alive(c.pid)]
    if not dead:
        print("the dev stack is already up ('make down' stops it):")
        _print(recorded)
        return 0
    for component in dead:
        print(f"{component.name} was not running (pid {component.pid} is gone): starting it again")
        code = restart(config, component.name)
        if code:
            return code
    print("the dev stack is up again:")
    _print(_load(config))
    return 0


def _named(components: Sequence[Component], name: str) -> Component | None:
    """The component called ``name``, also by its short name (``worker``, ``chat``, ``nats``)."""
    for component in components:
        short = component.name.removesuffix("_svc").removeprefix("task_")
        if name in (component.name, short, component.name.split("-")[0]):
            return component
    return None


def restart(config: StackConfig, name: str) -> int:
    """Stops one component (if it runs) and starts it with its recorded command and env."""
    recorded = _load(config)
    found = _named(recorded, name)
    if found is None:
        names = ", ".join(c.name for c in recorded) or "none: 'make up' starts the stack"
        print(f"no component {name!r} in the dev stack (components: {names})", file=sys.stderr)
        return 2
    if not found.argv:
        print(f"{name} was started by an older 'make up': 'make down && make up'", file=sys.stderr)
        return 1
    name = found.name
    _stop([found])
    try:
        fresh = _relaunch(config, found)
    except ServerStartError as error:
        print(f"restarting {name} failed: {error}", file=sys.stderr)
        return 1
    _save(config, [fresh if c.name == name else c for c in _load(config)])
    print(f"restarted {name} (pid {fresh.pid}, log {fresh.log})")
    return 0


def _relaunch(config: StackConfig, component: Component) -> Component:
    process = component.process()
    process.start(timeout=30)
    fresh = dataclasses.replace(component, pid=process.pid)
    if fresh.grpc_port:
        _wait_serving(fresh, process, timeout=15)
    if fresh.name == "envoy":
        _wait_edge_live(config.edge_admin_port, process)
    return fresh


def _ports_in_use(config: StackConfig) -> list[str]:
    """The stack's ports that another program already holds, named."""
    wanted = {
        "redis": config.redis_port,
        "nats": config.nats_port,
        "mail sink": config.smtp_port,
        "notify webhooks": config.webhook_port,
        "identity (OAuth, JWKS)": config.identity_http_port,
        "envoy": config.edge_port,
        "envoy admin": config.edge_admin_port,
        "web client": config.web_port,
        "prometheus": config.prometheus_port,
        "alertmanager": config.alertmanager_port,
    }
    wanted.update({spec.name: spec.grpc_port for spec in config.services})
    return [f"{name} port {port}" for name, port in wanted.items() if _port_taken(port)]


def _started(config: StackConfig, started: list[Component], component: Component) -> None:
    """Records a component at once, so a failure later still stops it."""
    started.append(component)
    _save(config, started)


def _start_stores(config: StackConfig, started: list[Component]) -> None:
    redis = RedisServer(
        config.run_dir / "redis",
        port=config.redis_port,
        password=_secret(config, "redis-password"),
        detach=True,
    ).start()
    assert redis.process is not None
    address = f"redis://127.0.0.1:{config.redis_port}/0 (password in redis-password)"
    _started(config, started, Component.of(redis.process, address))
    nats = NatsServer(
        config.run_dir / "nats",
        port=config.nats_port,
        user=NATS_USER,
        password=_secret(config, "nats-password"),
        detach=True,
    ).start()
    assert nats.process is not None
    address = f"nats://127.0.0.1:{config.nats_port} (JetStream; {NATS_USER}, nats-password)"
    _started(config, started, Component.of(nats.process, address))


def _start_mail_sink(config: StackConfig, started: list[Component]) -> None:
    sink = ManagedProcess(
        "mail_sink",
        [
            sys.executable,
            "-m",
            "devtools.mailsink",
            "serve",
            str(config.mail_dir),
            "--port",
            str(config.smtp_port),
        ],
        log_path=config.run_dir / "logs" / "mail_sink.log",
        ready=re.compile(r"mail sink listening"),
        detach=True,
    )
    sink.start()
    address = f"smtp://127.0.0.1:{config.smtp_port} (make mail lists it)"
    _started(config, started, Component.of(sink, address))


def prometheus_config(config: StackConfig) -> str:
    """Prometheus for the stack: every service's metrics (labelled ``service``), the mesh's
    alert rules, alerts to the stack's Alertmanager; it also scrapes itself and Alertmanager."""
    targets = [
        ScrapeTarget(
            job="opsmesh",
            address=f"127.0.0.1:{spec.metrics_port}",
            labels={"service": spec.name},
        )
        for spec in config.services
    ]
    targets += [
        ScrapeTarget(job=name, address=f"127.0.0.1:{port}", labels={"service": name})
        for name, port in (
            ("prometheus", config.prometheus_port),
            ("alertmanager", config.alertmanager_port),
        )
    ]
    return render_prometheus_config(
        targets=targets,
        rule_files=[MESH_RULES],
        alertmanagers=[f"127.0.0.1:{config.alertmanager_port}"],
    )


def alertmanager_config(config: StackConfig) -> str:
    """Alertmanager for the stack: every alert to notify_svc's webhook, with its bearer token."""
    return render_alertmanager_config(
        webhook_url=f"http://127.0.0.1:{config.webhook_port}/webhooks/alertmanager",
        token_file=config.alert_token_file,
    )


def _alert_token(config: StackConfig) -> str:
    """The bearer token Alertmanager shows notify_svc (made once, kept in the run folder)."""
    return _secret(config, config.alert_token_file.name)


def _start_monitoring(config: StackConfig, started: list[Component]) -> None:
    _alert_token(config)
    alertmanager = AlertmanagerServer(
        config.run_dir / "alertmanager",
        alertmanager_config(config),
        port=config.alertmanager_port,
        detach=True,
    ).start()
    assert alertmanager.process is not None
    address = f"{alertmanager.url} (alerts → notify_svc webhook)"
    _started(config, started, Component.of(alertmanager.process, address))
    prometheus = PrometheusServer(
        config.run_dir / "prometheus",
        prometheus_config(config),
        port=config.prometheus_port,
        detach=True,
    ).start()
    assert prometheus.process is not None
    address = f"{prometheus.url} (scrapes every service, mesh alert rules)"
    _started(config, started, Component.of(prometheus.process, address))


def _start_services(config: StackConfig, started: list[Component]) -> None:
    for spec in config.services:
        env = _service_env(config, spec.grpc_port, spec.metrics_port)
        process = ManagedProcess(
            spec.name,
            [sys.executable, "-m", spec.module],
            log_path=config.run_dir / "logs" / f"{spec.name}.log",
            ready=re.compile(spec.ready),
            env=env | service_secrets(config, spec.name),
            detach=True,
        )
        process.start()
        address = (
            f"grpc 127.0.0.1:{spec.grpc_port}  metrics http://127.0.0.1:{spec.metrics_port}/metrics"
        )
        component = Component.of(process, address, grpc_port=spec.grpc_port)
        _started(config, started, component)
        _wait_serving(component, process, timeout=15)


def _start_web(config: StackConfig, started: list[Component]) -> None:
    if not (config.web_root / "index.html").is_file():
        raise ServerStartError(
            "webui", f"no web client build in {config.web_root} (make up builds it)"
        )
    web = ManagedProcess(
        "webui",
        [sys.executable, "-m", "webui"],
        log_path=config.run_dir / "logs" / "webui.log",
        ready=re.compile(r"serving the web client"),
        env=dict(
            os.environ,
            OPSMESH_HOST="127.0.0.1",
            OPSMESH_WEB_PORT=str(config.web_port),
            OPSMESH_WEB_ROOT=str(config.web_root),
        ),
        detach=True,
    )
    web.start()
    address = f"http://127.0.0.1:{config.web_port} ({config.web_root})"
    _started(config, started, Component.of(web, address))


def edge_config(config: StackConfig) -> str:
    """envoy.yaml for the stack: its ports, issuer, bind address, CORS origins and the
    credential it shows ratelimit_svc."""
    ports = {
        "edge": config.edge_port,
        "admin": config.edge_admin_port,
        "identity_http": config.identity_http_port,
        "web": config.web_port,
        **{
            spec.name.removesuffix("_svc"): spec.grpc_port
            for spec in config.services
            if spec.name.removesuffix("_svc") in DEFAULT_PORTS
        },
    }
    topology = EdgeTopology.dev(
        ports,
        issuer=config.public_url,
        bind_address=config.bind_address,
        edge_credential=edge_credential(config),
        ui_origin=config.ui_dev_origin,
    )
    return render(topology)


def _start_edge(config: StackConfig, started: list[Component]) -> None:
    path = config.run_dir / "envoy.yaml"
    path.touch(mode=0o600)
    path.chmod(0o600)  # it holds the edge's credential
    path.write_text(edge_config(config))
    envoy = envoy_process(path, config.run_dir / "logs" / "envoy.log", detach=True)
    envoy.start(timeout=30)
    _wait_edge_live(config.edge_admin_port, envoy)
    address = (
        f"http://{config.bind_address}:{config.edge_port} (gRPC, grpc-web, OAuth)  "
        f"admin :{config.edge_admin_port}"
    )
    _started(config, started, Component.of(envoy, address))


START_STEPS = (
    _start_stores,
    _start_mail_sink,
    _start_monitoring,
    _start_services,
    _start_web,
    _start_edge,
)


def _welcome(config: StackConfig, started: Sequence[Component]) -> None:
    user, password = _seed_dev_user(config)
    print(f"opsmesh dev stack is up (state and logs in {config.run_dir}):")
    _print(started)
    print(
        f"\nopen {config.public_url} and sign in as {user} / {password} (org dev)\n"
        f"a token for grpcurl (the edge or a service port): {token_command(config, user)}"
    )
    first = config.services[0].grpc_port
    ollama = os.environ.get("OLLAMA_HOST", "http://127.0.0.1:11434")
    print(
        f"\nchat uses the Ollama server at {ollama} (set OLLAMA_HOST to change it)"
        f"\ntry:  grpcurl -plaintext localhost:{first} list"
        f"\n      grpcurl -plaintext -H 'authorization: Bearer <token>' "
        f"localhost:{config.edge_port} list   (every public service, through the edge)"
        "\nstop: make down"
    )


def token_command(config: StackConfig, user: str) -> str:
    """A shell command that prints an access token; it works as pasted (no venv needed)."""
    return shlex.join(
        [
            "env",
            f"OPSMESH_JWT_KEYS_DIR={(config.run_dir / 'keys').resolve()}",
            f"OPSMESH_JWT_ISSUER={config.public_url}",
            sys.executable,
            "-m",
            "identity_svc.tokens",
            "issue",
            "--user",
            user,
            "--org",
            "dev",
        ]
    )


def _wait_edge_live(admin_port: int, process: ManagedProcess, timeout: float = 20) -> None:
    """Envoy's listeners open once warm (the JWKS fetched): its admin /ready says LIVE."""
    deadline = time.monotonic() + timeout
    state = "unknown"
    while time.monotonic() < deadline:
        if not process.running():
            raise ServerStartError("envoy", "exited during start-up")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=1) as reply:
                state = reply.read().decode().strip()
        except OSError as error:
            state = getattr(error, "reason", str(error))
            state = str(state)
        if state == "LIVE":
            return
        time.sleep(0.1)
    raise ServerStartError("envoy", f"not LIVE after {timeout:g}s ({state})")


DEV_USER_EMAIL = "dev@example.com"


def _seed_dev_user(config: StackConfig) -> tuple[str, str]:
    """The dev user (created if missing); its password is kept in the run folder."""
    credentials = config.run_dir / "dev-credentials"
    if not credentials.exists():
        credentials.write_text(secrets.token_urlsafe(12))
        credentials.chmod(0o600)
    password = credentials.read_text().strip()
    env = dict(os.environ, OPSMESH_REDIS_URL=redis_url(config))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "identity_svc.accounts",
            "create",
            "--org",
            "dev",
            "--user",
            "dev",
            "--roles",
            # The dev org's admin, and the stack's operator: the agents show the whole platform.
            "admin,platform:admin",
            # Where "Forgot password?" sends the dev user's reset link (make mail shows it).
            "--email",
            DEV_USER_EMAIL,
            "--password-stdin",
            "--if-missing",
        ],
        input=password + "\n",
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return "dev", password


def _stop(components: Sequence[Component], timeout: float = 15.0) -> None:
    for component in reversed(components):
        if not pid_alive(component.pid):
            continue
        os.kill(component.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while pid_alive(component.pid) and time.monotonic() < deadline:
            _reap(component.pid)
            time.sleep(0.05)
        if pid_alive(component.pid):
            os.kill(component.pid, signal.SIGKILL)
        print(f"stopped {component.name} (pid {component.pid})")


def _reap(pid: int) -> None:
    # Our own children (when up and down run in one process) must be reaped to disappear.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def down(config: StackConfig) -> int:
    components = _load(config)
    if not components:
        print("the dev stack is not running")
        return 0
    _stop(components)
    config.state_file.unlink(missing_ok=True)
    return 0


def status(config: StackConfig) -> int:
    components = _load(config)
    if not components:
        print("the dev stack is not running ('make up' starts it)")
        return 1
    _print(components)
    return 0 if all(pid_alive(c.pid) for c in components) else 1


def _print(components: Sequence[Component]) -> None:
    for c in components:
        state = "running" if pid_alive(c.pid) else "DEAD"
        if c.grpc_port and state == "running":
            state = health_status(c.grpc_port)
        print(f"  {c.name:<12} {c.address:<60} pid {c.pid:<7} {state}")
        print(f"  {'':<12} log: {c.log}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.stack", description=__doc__)
    parser.add_argument("command", choices=("up", "down", "status", "restart"))
    parser.add_argument("name", nargs="?", help="restart: the component (make status lists them)")
    args = parser.parse_args(argv)
    config = StackConfig.from_env(os.environ, Path.cwd())
    if args.command == "restart":
        if not args.name:
            parser.error("restart needs the component's name (make restart NAME=chat_svc)")
        return restart(config, args.name)
    commands = {"up": up, "down": down, "status": status}
    return commands[args.command](config)


if __name__ == "__main__":
    raise SystemExit(main())
