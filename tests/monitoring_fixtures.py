"""A real Prometheus and Alertmanager with two organizations' metrics and firing alerts.

Import the fixture into a test module (``from tests.monitoring_fixtures import monitoring``)
to share the one session-wide stack: a small metrics target (prometheus_client in a
thread) with series of orgs ``acme`` and ``globex`` and one without an org, Prometheus
scraping it every second and evaluating :data:`RULES`, Alertmanager receiving the alerts
and posting them to a webhook recorder that stands where notify_svc's webhook would.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from devtools.servers import (
    AlertmanagerServer,
    PrometheusServer,
    ScrapeTarget,
    render_alertmanager_config,
    render_prometheus_config,
)

QUEUE_DEPTH = {"acme": 7.0, "globex": 42.0}
"""opsmesh_demo_queue_depth{org_id} values: globex is the larger one."""
REQUESTS = {("acme", "/a"): 3.0, ("acme", "/b"): 5.0, ("globex", "/a"): 11.0}
"""opsmesh_demo_requests_total{org_id, route} values."""
WEBHOOK_PATH = "/webhooks/alertmanager"

RULES = """
groups:
  - name: demo
    rules:
      - alert: DemoAcmeBacklog
        expr: opsmesh_demo_queue_depth{org_id="acme"} > 0
        for: 0s
        labels: {org_id: acme, severity: critical}
        annotations: {summary: "acme queue is not empty"}
      - alert: DemoAcmeMuted
        expr: opsmesh_demo_queue_depth{org_id="acme"} > 0
        for: 0s
        labels: {org_id: acme, severity: warning}
        annotations: {summary: "silenced by the fixture"}
      - alert: DemoAcmeNever
        expr: opsmesh_demo_queue_depth{org_id="acme"} > 1000
        labels: {org_id: acme, severity: warning}
      - alert: DemoGlobexBacklog
        expr: opsmesh_demo_queue_depth{org_id="globex"} > 0
        for: 0s
        labels: {org_id: globex, severity: critical}
        annotations: {summary: "globex queue is not empty"}
      - alert: DemoPlatformBuild
        expr: opsmesh_demo_build_info > 0
        for: 0s
        labels: {severity: info}
        annotations: {summary: "a platform alert without an organization"}
"""


@dataclass(frozen=True, kw_only=True)
class Monitoring:
    prometheus_url: str
    alertmanager_url: str
    queue_depth: dict[str, float]
    requests: dict[tuple[str, str], float]
    acme_alerts: tuple[str, ...] = ("DemoAcmeBacklog",)
    """Firing, not silenced, for org acme."""
    acme_silenced: tuple[str, ...] = ("DemoAcmeMuted",)
    globex_alerts: tuple[str, ...] = ("DemoGlobexBacklog",)
    platform_alerts: tuple[str, ...] = ("DemoPlatformBuild",)
    acme_silence_id: str = ""
    globex_silence_id: str = ""
    webhook_token: str = ""
    webhook_posts: list[dict[str, Any]] = field(default_factory=list)
    """Alertmanager's webhook calls: {"authorization": header, "body": payload}."""
    alertmanager_config: Path = Path()
    prometheus_config: Path = Path()


def _metrics_target() -> tuple[Any, int]:
    registry = CollectorRegistry()
    depth = Gauge("opsmesh_demo_queue_depth", "Demo queue depth.", ["org_id"], registry=registry)
    for org, value in QUEUE_DEPTH.items():
        depth.labels(org_id=org).set(value)
    requests = Counter(
        "opsmesh_demo_requests", "Demo requests.", ["org_id", "route"], registry=registry
    )
    for (org, route), value in REQUESTS.items():
        requests.labels(org_id=org, route=route).inc(value)
    odd = Gauge("opsmesh_demo_ratio", "NaN and infinities.", ["org_id", "kind"], registry=registry)
    odd.labels(org_id="acme", kind="nan").set(float("nan"))
    odd.labels(org_id="acme", kind="inf").set(float("inf"))
    odd.labels(org_id="acme", kind="one").set(1.0)
    build = Gauge("opsmesh_demo_build_info", "No org.", ["version"], registry=registry)
    build.labels(version="1.2.3").set(1)
    server, _ = start_http_server(0, addr="127.0.0.1", registry=registry)
    return server, int(server.server_port)


def _webhook_recorder(posts: list[dict[str, Any]]) -> ThreadingHTTPServer:
    class Recorder(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            posts.append(
                {
                    "path": self.path,
                    "authorization": self.headers.get("Authorization", ""),
                    "body": json.loads(body or b"{}"),
                }
            )
            self.send_response(202)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=2) as reply:  # noqa: S310 - our own loopback
        return json.load(reply)


def _silence(alertmanager_url: str, alertname: str, org: str) -> str:
    now = time.time()
    body = {
        "matchers": [
            {"name": "alertname", "value": alertname, "isRegex": False, "isEqual": True},
            {"name": "org_id", "value": org, "isRegex": False, "isEqual": True},
        ],
        "startsAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 60)),
        "endsAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + 3600)),
        "createdBy": f"fixture-{org}",
        "comment": f"muted for {org}",
    }
    request = urllib.request.Request(  # noqa: S310 - our own loopback
        f"{alertmanager_url}/api/v2/silences",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=2) as reply:  # noqa: S310
        return str(json.load(reply)["silenceID"])


def _wait_for(condition: Any, what: str, timeout: float = 20.0) -> Any:
    """Polls ``condition`` (truthy result wins) until the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = condition()
        except OSError as error:
            last = error
        if last and not isinstance(last, OSError):
            return last
        time.sleep(0.1)
    raise AssertionError(f"{what} not seen after {timeout:g}s (last: {last!r})")


@pytest.fixture(scope="session")
def monitoring(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Monitoring]:
    workdir = tmp_path_factory.mktemp("monitoring")
    target, target_port = _metrics_target()
    posts: list[dict[str, Any]] = []
    recorder = _webhook_recorder(posts)
    token = secrets.token_urlsafe(16)
    token_file = workdir / "webhook-token"
    token_file.write_text(token)
    rules = workdir / "demo.rules.yml"
    rules.write_text(RULES)
    alertmanager = AlertmanagerServer(
        workdir / "alertmanager",
        render_alertmanager_config(
            webhook_url=f"http://127.0.0.1:{recorder.server_port}{WEBHOOK_PATH}",
            token_file=token_file,
            group_wait="1s",
            group_interval="1s",
        ),
    ).start()
    prometheus = PrometheusServer(
        workdir / "prometheus",
        render_prometheus_config(
            targets=[
                ScrapeTarget(
                    job="demo", address=f"127.0.0.1:{target_port}", labels={"service": "demo"}
                )
            ],
            rule_files=[rules],
            alertmanagers=[f"127.0.0.1:{alertmanager.port}"],
            scrape_interval="1s",
            evaluation_interval="1s",
        ),
    )
    try:
        prometheus.start()
        acme_silence = _silence(alertmanager.url, "DemoAcmeMuted", "acme")
        globex_silence = _silence(alertmanager.url, "DemoGlobexMuted", "globex")

        def all_alerts_arrived() -> bool:
            names = {a["labels"]["alertname"] for a in _get(f"{alertmanager.url}/api/v2/alerts")}
            return {"DemoAcmeBacklog", "DemoAcmeMuted", "DemoGlobexBacklog"} <= names

        _wait_for(all_alerts_arrived, "the demo alerts in Alertmanager")
        yield Monitoring(
            prometheus_url=prometheus.url,
            alertmanager_url=alertmanager.url,
            queue_depth=dict(QUEUE_DEPTH),
            requests=dict(REQUESTS),
            acme_silence_id=acme_silence,
            globex_silence_id=globex_silence,
            webhook_token=token,
            webhook_posts=posts,
            alertmanager_config=alertmanager.config_path,
            prometheus_config=prometheus.config_path,
        )
    finally:
        prometheus.stop()
        alertmanager.stop()
        recorder.shutdown()
        target.shutdown()
