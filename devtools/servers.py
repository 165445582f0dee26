"""Real Redis, Redis Sentinel, NATS, Prometheus and Alertmanager servers as child processes.

Used by the test fixtures (ephemeral ports, temporary folders) and by the dev
stack (fixed ports, detached). Readiness is read from each server's own log
output, never guessed with sleeps; a server that exits during start-up raises
:class:`ServerStartError` with the end of its log.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

_INSTALL_HINTS = {
    "redis-server": "apt-get install redis-server",
    "nats-server": "apt-get install nats-server",
    "prometheus": "apt-get install prometheus",
    "promtool": "apt-get install prometheus",
    "prometheus-alertmanager": "apt-get install prometheus-alertmanager",
    "amtool": "apt-get install prometheus-alertmanager",
}

MONITORING_DIR = Path(__file__).resolve().parent.parent / "deploy" / "monitoring"
"""The Prometheus and Alertmanager templates and the mesh's alert rules."""
# One rules file for the dev stack, the tests and the Kubernetes base (a kustomize ConfigMap).
MESH_RULES = MONITORING_DIR.parent / "k8s" / "base" / "monitoring" / "opsmesh.rules.yml"


class ServerStartError(RuntimeError):
    def __init__(self, name: str, reason: str, log_tail: str = "") -> None:
        message = f"{name} did not start: {reason}"
        if log_tail:
            message += f"\n--- last lines of its log ---\n{log_tail}"
        super().__init__(message)
        self.name = name


def find_binary(name: str) -> str:
    """The path of a server binary, or a clear error naming the package to install."""
    found = shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/bin") / name) if p.exists()), None
    )
    if found is None:
        hint = _INSTALL_HINTS.get(name, f"install {name}")
        raise ServerStartError(name, f"{name} is not installed (on Debian: {hint})")
    return found


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (for servers that cannot pick their own).

    It is chosen below the kernel's ephemeral range: the operating system gives ports of that
    range to every outgoing connection and to every server bound to port 0, so a port picked
    there may be taken by the time its server binds it (seen: a stack of a dozen processes
    scraping and calling each other). Ports handed out in this process are not handed out again.
    """
    low = 20000
    high = min(_ephemeral_range()[0], 65536) - 1
    if high <= low:  # an unusual range: let the kernel choose
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port: int = sock.getsockname()[1]
            return port
    for _ in range(200):
        candidate = random.randint(low, high)  # noqa: S311 - not a secret
        if candidate in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, candidate))
            except OSError:
                continue
        _handed_out.add(candidate)
        return candidate
    raise ServerStartError("free_port", f"no free port found between {low} and {high}")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class ManagedProcess:
    """A server process whose readiness is a line in its log."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        ready: re.Pattern[str],
        env: Mapping[str, str] | None = None,
        detach: bool = False,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._ready = ready
        self._env = dict(env) if env is not None else None
        self._detach = detach
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str] | None:
        """The environment it runs with (None: the caller's)."""
        return None if self._env is None else dict(self._env)

    @property
    def ready(self) -> re.Pattern[str]:
        return self._ready

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} is not running"
        return self.process.pid

    def start(self, timeout: float = 15.0) -> re.Match[str]:
        """Starts the process and waits until its log shows the ready line."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env,
                start_new_session=self._detach,
            )
        deadline = time.monotonic() + timeout
        with self.log_path.open("r", errors="replace") as reader:
            reader.seek(offset)
            seen = ""
            while True:
                seen += reader.read()
                match = self._ready.search(seen)
                if match is not None:
                    return match
                if self.process.poll() is not None:
                    raise ServerStartError(
                        self.name,
                        f"exited with code {self.process.returncode}",
                        _tail(self.log_path),
                    )
                if time.monotonic() > deadline:
                    self.kill()
                    raise ServerStartError(
                        self.name, f"not ready after {timeout:g}s", _tail(self.log_path)
                    )
                time.sleep(0.01)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class _Server:
    """A server run by a :class:`ManagedProcess` once started."""

    process: ManagedProcess | None = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()


class RedisServer(_Server):
    """``redis-server`` on loopback with persistence off."""

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        detach: bool = False,
        name: str = "redis",
        password: str = "",
    ) -> None:
        self.workdir = workdir
        self.port = port or 0
        self._fixed_port = port is not None
        self._detach = detach
        self.name = name
        self.password = password
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        credentials = f":{self.password}@" if self.password else ""
        return f"redis://{credentials}127.0.0.1:{self.port}/0"

    def _config_file(self) -> Path:
        """A 0600 config file: a password on the command line would show in everyone's ps."""
        config = self.workdir / f"{self.name}.conf"
        config.touch(mode=0o600)
        config.chmod(0o600)
        config.write_text(f'requirepass "{self.password}"\n' if self.password else "")
        return config

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self._config_file()
        attempts = 1 if self._fixed_port else 5
        for attempt in range(attempts):
            if not self._fixed_port:
                self.port = free_port()
            self.process = ManagedProcess(
                self.name,
                [
                    find_binary("redis-server"),
                    str(config),
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.workdir),
                    "--logfile",
                    "",
                    "--daemonize",
                    "no",
                ],
                log_path=self.workdir / f"{self.name}.log",
                ready=re.compile(r"Ready to accept connections"),
                detach=self._detach,
            )
            try:
                self.process.start()
                self._fixed_port = True  # a restart comes back on the same port
                return self
            except ServerStartError:
                # Another process may have taken the free port between probe and bind.
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover


class RedisSentinel(_Server):
    """A ``redis-server --sentinel`` monitoring one master as ``master_name``."""

    def __init__(self, workdir: Path, *, master_port: int, master_name: str = "mymaster") -> None:
        self.workdir = workdir
        self.master_port = master_port
        self.master_name = master_name
        self.port = 0
        self.process: ManagedProcess | None = None

    def start(self) -> RedisSentinel:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        config = self.workdir / "sentinel.conf"
        config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.workdir}\n"
            f"sentinel monitor {self.master_name} 127.0.0.1 {self.master_port} 1\n"
            f"sentinel down-after-milliseconds {self.master_name} 2000\n"
        )
        self.process = ManagedProcess(
            "redis-sentinel",
            [find_binary("redis-server"), str(config), "--sentinel"],
            log_path=self.workdir / "sentinel.log",
            ready=re.compile(r"\+monitor master " + re.escape(self.master_name)),
        )
        self.process.start()
        return self


class NatsServer(_Server):
    """``nats-server`` with JetStream, storing under ``workdir``."""

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        detach: bool = False,
        user: str = "",
        password: str = "",
    ) -> None:
        self.workdir = workdir
        self.port = port or -1  # -1: nats-server picks a free port and logs it
        self._detach = detach
        self.user = user
        self.password = password
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        credentials = f"{self.user}:{self.password}@" if self.user else ""
        return f"nats://{credentials}127.0.0.1:{self.port}"

    def _config_file(self) -> Path:
        """A 0600 config file (credentials on the command line would show in everyone's ps)."""
        config = self.workdir / "nats.conf"
        config.touch(mode=0o600)
        config.chmod(0o600)
        account = json.dumps({"user": self.user, "password": self.password})
        config.write_text(f"authorization: {account}\n" if self.user else "")
        return config

    def start(self) -> NatsServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = ManagedProcess(
            "nats",
            [
                find_binary("nats-server"),
                "-c",
                str(self._config_file()),
                "-a",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-js",
                "-sd",
                str(self.workdir / "jetstream"),
            ],
            log_path=self.workdir / "nats.log",
            ready=re.compile(
                r"Listening for client connections on [^\s]*:(\d+)(?s:.*)"
                r"Server is ready"
            ),
            detach=self._detach,
        )
        match = self.process.start()
        self.port = int(match.group(1))
        return self


@dataclass(frozen=True, kw_only=True)
class ScrapeTarget:
    """One endpoint Prometheus scrapes; ``labels`` are added to all its series."""

    job: str
    address: str
    """host:port"""
    labels: Mapping[str, str] = field(default_factory=dict)
    metrics_path: str = "/metrics"


def _template(name: str) -> jinja2.Template:
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(MONITORING_DIR),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,  # noqa: S701 - YAML, every value goes through tojson
    )
    return environment.get_template(name)


def render_prometheus_config(
    *,
    targets: Sequence[ScrapeTarget],
    rule_files: Sequence[Path] = (),
    alertmanagers: Sequence[str] = (),
    scrape_interval: str = "15s",
    evaluation_interval: str = "15s",
) -> str:
    """prometheus.yml from ``deploy/monitoring/prometheus.yml.j2``."""
    return _template("prometheus.yml.j2").render(
        scrape_targets=[
            {
                "job": t.job,
                "address": t.address,
                "labels": dict(t.labels),
                "metrics_path": t.metrics_path,
            }
            for t in targets
        ],
        rule_files=[str(path) for path in rule_files],
        alertmanagers=list(alertmanagers),
        scrape_interval=scrape_interval,
        evaluation_interval=evaluation_interval,
    )


def render_alertmanager_config(
    *,
    webhook_url: str,
    token_file: Path | None = None,
    group_wait: str = "30s",
    group_interval: str = "5m",
    repeat_interval: str = "4h",
) -> str:
    """alertmanager.yml from ``deploy/monitoring/alertmanager.yml.j2``.

    ``token_file`` holds notify_svc's OPSMESH_ALERT_WEBHOOK_TOKEN, sent as a bearer token.
    """
    return _template("alertmanager.yml.j2").render(
        webhook_url=webhook_url,
        token_file=str(token_file) if token_file is not None else "",
        group_wait=group_wait,
        group_interval=group_interval,
        repeat_interval=repeat_interval,
    )


# Both print the address they bound ("Listening on" address=127.0.0.1:PORT), so port 0
# lets them pick a free port without a probe-then-bind race.
_LISTENING = r'msg="Listening on" address=[^\s]*:(\d+)'


class _HttpServer(_Server):
    """An HTTP server on loopback configured by one file in ``workdir``; port 0 picks a free one."""

    name = ""
    config_name = ""

    def __init__(
        self, workdir: Path, config: str, *, port: int | None = None, detach: bool = False
    ) -> None:
        self.workdir = workdir
        self.config = config
        self.port = port or 0
        self._detach = detach
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.workdir / self.config_name

    def _argv(self) -> list[str]:
        raise NotImplementedError

    _ready = _LISTENING

    def _launch(self, timeout: float) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config)
        self.process = ManagedProcess(
            self.name,
            self._argv(),
            log_path=self.workdir / f"{self.name}.log",
            ready=re.compile(self._ready),
            detach=self._detach,
        )
        # The real port comes from the server's own "Listening on" line (no free-port race).
        self.port = int(self.process.start(timeout).group(1))


class PrometheusServer(_HttpServer):
    """``prometheus`` on loopback with its TSDB in ``workdir``, reloadable (/-/reload)."""

    name = "prometheus"
    config_name = "prometheus.yml"
    # Both lines come from different goroutines, so either may be logged first.
    _ready = r"(?s)\A(?=.*Server is ready to receive web requests)(?=.*" + _LISTENING + ")"

    def _argv(self) -> list[str]:
        return [
            find_binary("prometheus"),
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--web.enable-lifecycle",
        ]

    def start(self, timeout: float = 30.0) -> PrometheusServer:
        self._launch(timeout)
        return self


class AlertmanagerServer(_HttpServer):
    """``prometheus-alertmanager`` on loopback, clustering off, state in ``workdir``.

    Its configuration is reloadable with ``POST /-/reload`` (always on in Alertmanager).
    """

    name = "alertmanager"
    config_name = "alertmanager.yml"

    def _argv(self) -> list[str]:
        return [
            find_binary("prometheus-alertmanager"),
            f"--config.file={self.config_path}",
            f"--storage.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--cluster.listen-address=",  # no gossip port (9094) to collide on
        ]

    def start(self, timeout: float = 30.0) -> AlertmanagerServer:
        self._launch(timeout)
        return self


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (exited, not yet reaped by its parent) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False  # no procfs (macOS): kill(0) is all there is
    return stat.rpartition(")")[2].split()[:1] == ["Z"]
