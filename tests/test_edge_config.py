"""The edge's one template (envoy/envoy.yaml.j2) and the topologies it is rendered with."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import jinja2
import pytest
import yaml

from devtools import edge, k8s
from devtools.edge import EdgeTopology, Upstream, render

MOVED_PORTS = {name: 20000 + index for index, name in enumerate(edge.DEFAULT_PORTS)}

VARIANTS = {
    "dev": EdgeTopology.dev(),
    "moved ports": EdgeTopology.dev(
        MOVED_PORTS,
        bind_address="0.0.0.0",
        issuer=f"http://127.0.0.1:{MOVED_PORTS['identity_http']}",
        ratelimit_domain="edge1234",
        edge_credential="a-credential",
    ),
    "k8s base": k8s.edge_topology(k8s.PUBLIC_URL),
    "k8s dev overlay": k8s.edge_topology(k8s.DEV_PUBLIC_URL),
}


def _walk(node: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from _walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)


def _referenced_clusters(config: dict[str, Any]) -> set[str]:
    """Every cluster a route, the JWKS fetch or the rate limit service names."""
    listeners = config["static_resources"]["listeners"]
    return {value for key, value in _walk(listeners) if key in ("cluster", "cluster_name")} - {None}


def _cors_origins(config: dict[str, Any]) -> list[str]:
    (matches,) = [v for k, v in _walk(config) if k == "allow_origin_string_match"]
    return [match["exact"] for match in matches]


def test_envoy_yaml_is_the_dev_topologys_rendering() -> None:
    assert edge.CONFIG.read_text() == render(EdgeTopology.dev()), (
        "run: python -m devtools.edge render > envoy/envoy.yaml"
    )


@pytest.mark.parametrize("name", VARIANTS)
def test_every_rendering_parses_and_names_each_cluster_once(name: str) -> None:
    topology = VARIANTS[name]
    config = yaml.safe_load(render(topology))
    clusters = config["static_resources"]["clusters"]
    names = [cluster["name"] for cluster in clusters]
    assert sorted(names) == sorted({upstream.name for upstream in topology.upstreams})
    assert _referenced_clusters(config) == set(names)
    for upstream, cluster in zip(topology.upstreams, clusters, strict=True):
        (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        assert cluster["type"] == upstream.discovery
        assert endpoint["endpoint"]["address"]["socket_address"] == {
            "address": upstream.host,
            "port_value": upstream.port,
        }
        assert ("typed_extension_protocol_options" in cluster) is upstream.grpc
    listener = config["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert listener == {"address": topology.listener.host, "port_value": topology.listener.port}
    admin = config["admin"]["address"]["socket_address"]
    assert admin == {"address": topology.admin.host, "port_value": topology.admin.port}
    assert _cors_origins(config) == list(topology.cors_origins)


def test_moved_ports_reach_every_address() -> None:
    topology = VARIANTS["moved ports"]
    text = render(topology)
    moved_away = set(edge.DEFAULT_PORTS.values())
    assert not any(f"port_value: {port} " in text for port in moved_away)
    identity_http = f"http://127.0.0.1:{MOVED_PORTS['identity_http']}"
    assert topology.jwks_uri == f"{identity_http}/.well-known/jwks.json"
    edge_url = f"http://localhost:{MOVED_PORTS['edge']}"
    assert topology.cors_origins == (edge.DEFAULT_UI_ORIGIN, edge_url)
    provider = next(v for k, v in _walk(yaml.safe_load(text)) if k == "opsmesh" and "issuer" in v)
    assert provider["issuer"] == identity_http
    assert provider["remote_jwks"]["http_uri"]["uri"] == topology.jwks_uri


def test_the_cluster_resolves_services_by_dns_and_keeps_the_dev_ports() -> None:
    topology = VARIANTS["k8s base"]
    dev = VARIANTS["dev"]
    assert {u.discovery for u in topology.upstreams} == {"STRICT_DNS"}
    assert {u.discovery for u in dev.upstreams} == {"STATIC"}
    assert [(u.name, u.port) for u in topology.upstreams] == [
        (u.name, u.port) for u in dev.upstreams
    ]
    assert topology.edge_credential == k8s.EDGE_CREDENTIAL_SLOT
    # Production browsers reach the edge from its public origin only; no localhost dev origin.
    assert topology.cors_origins == (k8s.PUBLIC_URL,)
    assert edge.DEFAULT_UI_ORIGIN in VARIANTS["k8s dev overlay"].cors_origins


def test_values_are_inserted_as_yaml_strings_whatever_they_hold() -> None:
    hostile = "http://x.example: #not-a-comment 'quoted' \"double\" <&>"
    topology = replace(
        EdgeTopology.dev(),
        issuer=hostile,
        cors_origins=(hostile,),
        ratelimit_domain="a: b",
        edge_credential='"}, {evil: 1}',
    )
    config = yaml.safe_load(render(topology))
    found = dict(_walk(config))
    assert _cors_origins(config) == [hostile]
    assert found["domain"] == "a: b"
    assert found["initial_metadata"] == [
        {"key": "x-opsmesh-edge-credential", "value": '"}, {evil: 1}'}
    ]
    assert next(v for k, v in _walk(config) if k == "issuer") == hostile


def test_a_template_variable_the_topology_lacks_fails_the_render(tmp_path: Path) -> None:
    template = tmp_path / "envoy.yaml.j2"
    template.write_text(edge.TEMPLATE.read_text() + "x: {{ topology.nothing }}\n")
    with pytest.raises(jinja2.UndefinedError, match="nothing"):
        render(EdgeTopology.dev(), template=template)


def test_a_topology_refuses_what_envoy_would_refuse_later() -> None:
    dev = EdgeTopology.dev()
    chat = next(u for u in dev.upstreams if u.name == "chat")
    with pytest.raises(ValueError, match="named twice: chat"):
        replace(dev, upstreams=(*dev.upstreams, chat))
    with pytest.raises(ValueError, match="no port named gateway"):
        EdgeTopology.dev({"gateway": 1})
    with pytest.raises(ValueError, match=r"not in 1\.\.65535"):
        EdgeTopology.dev({"edge": 70000})
    with pytest.raises(ValueError, match="lowercase"):
        Upstream(name="Chat: x", host="127.0.0.1", port=1, grpc=True)
    with pytest.raises(ValueError, match="no CORS origin"):
        replace(dev, cors_origins=())
    assert Upstream(name="chat", host="::1", port=1, grpc=True).discovery == "STATIC"
    assert Upstream(name="chat", host="chat", port=1, grpc=True).discovery == "STRICT_DNS"


def test_the_command_line_prints_the_dev_rendering(capsys: pytest.CaptureFixture[str]) -> None:
    assert edge.main(["render"]) == 0
    assert capsys.readouterr().out == edge.CONFIG.read_text()
    assert edge.main(["supervise"]) == 2
    assert "usage:" in capsys.readouterr().err
