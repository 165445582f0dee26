"""The kustomize overlays under deploy/k8s build, validate and agree with themselves.

Every check is a function returning the problems it finds, so the tests below also show each
check failing on a broken copy of the rendered output.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from devtools import edge, k8s
from task_svc import workspace

OVERLAYS = ("dev", "prod")
KUBECTL = shutil.which("kubectl") or str(Path(sys.executable).parent / "kubectl")
# Stateful Services and pod ports the mesh relies on; checked against the real objects when
# their directories are in the base, against this contract while they are not.
CONTRACT_SERVICES = {name: {port} for name, port in k8s.STATEFUL_SERVICES.items()}
CONTRACT_PODS = {
    "redis": set(k8s.REDIS_PORTS),
    "redis-sentinel": {26379},
    **{name: {port} for name, port in k8s.STATEFUL_SERVICES.items() if name != "redis-sentinel"},
}
ADDRESS = re.compile(r"^(?:[a-z][a-z0-9+.-]*://)?(?:[^@/]*@)?([a-z][a-z0-9-]*):(\d+)(?:/.*)?$")
ADDRESS_VARIABLES = re.compile(r"_(ADDR|URL|DSN|SENTINELS|SOURCE)$|^OLLAMA_HOST$")
NOT_IN_CLUSTER = {"OPSMESH_JWT_ISSUER", "OPSMESH_SENDGRID_URL"}
"""The public URL (reached from outside) and external APIs."""


def build(overlay: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        [KUBECTL, "kustomize", str(k8s.K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


_BUILT: dict[str, list[dict[str, Any]]] = {}


@pytest.fixture(params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    overlay = str(request.param)
    if overlay not in _BUILT:
        _BUILT[overlay] = build(overlay)
    return copy.deepcopy(_BUILT[overlay])


@pytest.fixture
def prod() -> list[dict[str, Any]]:
    if "prod" not in _BUILT:
        _BUILT["prod"] = build("prod")
    return copy.deepcopy(_BUILT["prod"])


def of_kind(documents: Iterable[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in documents if d["kind"] == kind]


def named(documents: Iterable[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(d for d in of_kind(documents, kind) if d["metadata"]["name"] == name)


WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet")


def pod_templates(documents: Iterable[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for document in documents:
        if document["kind"] in WORKLOADS:
            yield document["metadata"]["name"], document["spec"]["template"]


def mesh_pods(documents: Iterable[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """The pods of this repository's images and the edge (the stateful parts are checked by
    their own tests)."""
    for name, template in pod_templates(documents):
        if template["metadata"]["labels"]["app.kubernetes.io/name"] in MESH_NAMES:
            yield name, template


MESH_NAMES = {c.name for c in k8s.COMPONENTS} | {"webui", "envoy"}


# --- the checks ----------------------------------------------------------------------------


def container_ports(documents: list[dict[str, Any]]) -> dict[str, dict[str | int, int]]:
    """app.kubernetes.io/name of each workload's pods -> its container ports by name and number."""
    ports: dict[str, dict[str | int, int]] = {}
    for _, template in pod_templates(documents):
        app = template["metadata"]["labels"].get("app.kubernetes.io/name", "")
        known = ports.setdefault(app, {})
        for container in template["spec"]["containers"]:
            for port in container.get("ports", []):
                known[port["containerPort"]] = port["containerPort"]
                if "name" in port:
                    known[port["name"]] = port["containerPort"]
    return ports


def service_ports(documents: list[dict[str, Any]]) -> dict[str, set[int]]:
    services = {
        d["metadata"]["name"]: {p["port"] for p in d["spec"]["ports"]}
        for d in of_kind(documents, "Service")
    }
    for name, ports in CONTRACT_SERVICES.items():
        services.setdefault(name, ports)
    return services


def pod_ports(documents: list[dict[str, Any]], app: str) -> set[int] | None:
    found = container_ports(documents).get(app)
    if found is not None:
        return set(found.values())
    return CONTRACT_PODS.get(app)


def env_values(documents: list[dict[str, Any]]) -> Iterator[tuple[str, str, str]]:
    """(workload, variable, value) of every literal or ConfigMap-sourced variable."""
    config_maps = {
        d["metadata"]["name"]: d.get("data", {}) for d in of_kind(documents, "ConfigMap")
    }
    for workload, template in pod_templates(documents):
        spec = template["spec"]
        for container in spec.get("initContainers", []) + spec["containers"]:
            for variable in container.get("env", []):
                if "value" in variable:
                    yield workload, variable["name"], variable["value"]
                ref = variable.get("valueFrom", {}).get("configMapKeyRef")
                if ref:
                    yield workload, variable["name"], config_maps[ref["name"]][ref["key"]]


def envoy_config(documents: list[dict[str, Any]]) -> dict[str, Any]:
    (config_map,) = [
        d for d in of_kind(documents, "ConfigMap") if d["metadata"]["name"].startswith("envoy-")
    ]
    loaded: dict[str, Any] = yaml.safe_load(config_map["data"]["envoy.yaml"])
    return loaded


def address_problems(documents: list[dict[str, Any]]) -> list[str]:
    problems: list[str] = []
    services = service_ports(documents)
    pods = container_ports(documents)

    def reaches(where: str, host: str, port: int) -> None:
        if port not in services.get(host, set()):
            problems.append(f"{where}: no Service {host} with port {port}")

    # Services point at container ports of their pods.
    for service in of_kind(documents, "Service"):
        app = service["spec"].get("selector", {}).get("app.kubernetes.io/name", "")
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            if app in pods and target not in pods[app]:
                problems.append(f"Service {service['metadata']['name']}: targetPort {target}")
    # Probes ask container ports.
    for workload, template in pod_templates(documents):
        for container in template["spec"]["containers"]:
            own = {p["containerPort"] for p in container.get("ports", [])}
            own |= {p["name"] for p in container.get("ports", []) if "name" in p}
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = container.get(kind, {})
                for action in ("grpc", "httpGet", "tcpSocket"):
                    if action in probe and probe[action]["port"] not in own:
                        problems.append(f"{workload} {kind}: port {probe[action]['port']}")
    # Envoy's clusters and its JWKS address Services.
    static = envoy_config(documents)["static_resources"]
    for cluster in static["clusters"]:
        for group in cluster["load_assignment"]["endpoints"]:
            for endpoint in group["lb_endpoints"]:
                address = endpoint["endpoint"]["address"]["socket_address"]
                reaches(
                    f"envoy cluster {cluster['name']}", address["address"], address["port_value"]
                )
    # Every address-valued variable names a Service and one of its ports.
    for workload, variable, value in env_values(documents):
        if variable in NOT_IN_CLUSTER:
            continue
        parts = [p.strip() for p in value.split(",")] if variable.endswith("SENTINELS") else [value]
        for part in parts:
            match = ADDRESS.match(part)
            if match:
                reaches(f"{workload} {variable}={value}", match.group(1), int(match.group(2)))
            elif ADDRESS_VARIABLES.search(variable):
                problems.append(f"{workload} {variable}={value}: not a host:port in the cluster")
    # NetworkPolicy ports are ports the selected pods listen on.
    for policy in of_kind(documents, "NetworkPolicy"):
        name = policy["metadata"]["name"]
        selected = _listening(documents, _selected_apps(policy["spec"]["podSelector"]))
        for rule in policy["spec"].get("ingress", []):
            for port in rule.get("ports", []):
                if selected is not None and port["port"] not in selected:
                    problems.append(f"NetworkPolicy {name}: its pods do not listen on {port}")
        for rule in policy["spec"].get("egress", []):
            for peer in rule.get("to", []):
                if "podSelector" not in peer or "namespaceSelector" in peer:
                    continue
                listening = _listening(documents, _selected_apps(peer["podSelector"]))
                for port in rule.get("ports", []):
                    if listening is None or port["port"] not in listening:
                        problems.append(f"NetworkPolicy {name}: egress to {peer} {port}")
    return problems


def _listening(documents: list[dict[str, Any]], apps: list[str]) -> set[int] | None:
    """The ports any of these pods listen on; None when none of them is known."""
    known = [ports for app in apps if (ports := pod_ports(documents, app)) is not None]
    return set().union(*known) if known else None


def _selected_apps(selector: dict[str, Any]) -> list[str]:
    if "app.kubernetes.io/name" in selector.get("matchLabels", {}):
        return [selector["matchLabels"]["app.kubernetes.io/name"]]
    apps: list[str] = []
    for expression in selector.get("matchExpressions", []):
        if expression["key"] == "app.kubernetes.io/name" and expression["operator"] == "In":
            apps += expression["values"]
    return apps


def hardening_problems(documents: list[dict[str, Any]]) -> list[str]:
    problems: list[str] = []
    for workload, template in mesh_pods(documents):
        spec = template["spec"]
        if spec.get("securityContext", {}).get("runAsNonRoot") is not True:
            problems.append(f"{workload}: pod runAsNonRoot")
        env_of: dict[str, str] = {}
        for container in spec.get("initContainers", []) + spec["containers"]:
            where = f"{workload}/{container['name']}"
            context = container.get("securityContext", {})
            expected = {
                "runAsNonRoot": True,
                "readOnlyRootFilesystem": True,
                "allowPrivilegeEscalation": False,
            }
            for key, value in expected.items():
                if context.get(key) is not value:
                    problems.append(f"{where}: {key} is not {value}")
            if context.get("capabilities", {}).get("drop") != ["ALL"]:
                problems.append(f"{where}: capabilities not dropped")
            if context.get("seccompProfile", {}).get("type") != "RuntimeDefault":
                problems.append(f"{where}: seccompProfile")
            resources = container.get("resources", {})
            for part in ("requests", "limits"):
                if not {"cpu", "memory"} <= set(resources.get(part, {})):
                    problems.append(f"{where}: {part} cpu and memory")
            if container["image"].split(":")[0] == k8s.SERVICES_IMAGE:
                env_of = {v["name"]: v.get("value", "") for v in container.get("env", [])}
                if env_of.get("OPSMESH_AUTH_MODE") != "jwt":
                    problems.append(f"{where}: OPSMESH_AUTH_MODE is not jwt")
                drain = float(env_of.get("OPSMESH_DRAIN_DELAY", "0").removesuffix("s"))
                grace_text = env_of.get("OPSMESH_GRACE_PERIOD")
                if grace_text is None:
                    problems.append(f"{where}: OPSMESH_GRACE_PERIOD not set")
                    continue
                grace = float(grace_text.removesuffix("s"))
                if spec.get("terminationGracePeriodSeconds", 30) < drain + grace:
                    problems.append(f"{where}: terminationGracePeriodSeconds < drain + grace")
        if not any(
            m["mountPath"] == "/tmp" for c in spec["containers"] for m in c.get("volumeMounts", [])
        ):
            problems.append(f"{workload}: no writable /tmp")
    return problems


# --- tests ---------------------------------------------------------------------------------


def test_generated_manifests_and_the_edge_config_are_current() -> None:
    assert k8s.stale_files() == [], "run: python -m devtools.k8s"


def test_every_edge_cluster_needs_a_service() -> None:
    dev = edge.EdgeTopology.dev()
    other = edge.Upstream(name="other", host="127.0.0.1", port=50099, grpc=True)
    with pytest.raises(ValueError, match=r"'other'.* no Service"):
        k8s.edge_topology(dev=replace(dev, upstreams=(*dev.upstreams, other)))


@pytest.mark.skipif(not (Path(sys.executable).parent / "envoy").exists(), reason="no envoy")
@pytest.mark.parametrize("path", ["base/edge/envoy.yml", "overlays/dev/envoy.yml"])
def test_envoy_accepts_the_cluster_config(path: str) -> None:
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "envoy"),
            "--mode",
            "validate",
            "-c",
            str(k8s.K8S / path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_base_lists_every_component_directory() -> None:
    listed = yaml.safe_load((k8s.BASE / "kustomization.yaml").read_text())["resources"]
    present = sorted(p.parent.name for p in k8s.BASE.glob("*/kustomization.yaml"))
    assert sorted(listed) == present


def test_every_rendered_object_validates(rendered: list[dict[str, Any]]) -> None:
    assert len(rendered) > 40
    for document in rendered:
        kubernetes_validate.validate(document, "1.37.0", strict=True)


def test_ports_probes_envoy_env_and_policies_agree(rendered: list[dict[str, Any]]) -> None:
    assert address_problems(rendered) == []


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda env: env.__setitem__("OPSMESH_TASK_ADDR", "task:50059"), "no Service task"),
        (lambda env: env.__setitem__("OPSMESH_PROMETHEUS_URL", "http://prom:9090"), "prom"),
        (lambda env: env.__setitem__("OPSMESH_SESSION_ADDR", "localhost"), "not a host:port"),
    ],
)
def test_a_wrong_address_is_found(prod: list[dict[str, Any]], mutate: Any, expected: str) -> None:
    chat = named(prod, "Deployment", "chat")["spec"]["template"]["spec"]["containers"][0]
    env = {v["name"]: v for v in chat["env"]}
    values = {name: v.get("value", "") for name, v in env.items()}
    mutate(values)
    for name, value in values.items():
        if name in env and "value" in env[name]:
            env[name]["value"] = value
    assert any(expected in problem for problem in address_problems(prod))


def test_a_wrong_probe_policy_or_cluster_port_is_found(prod: list[dict[str, Any]]) -> None:
    container = named(prod, "Deployment", "task")["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbe"]["grpc"]["port"] = 50099
    policy = named(prod, "NetworkPolicy", "chat-traffic")
    policy["spec"]["egress"][0]["ports"][0]["port"] = 1234
    named(prod, "Service", "ratelimit")["spec"]["ports"][0]["port"] = 50056
    problems = "\n".join(address_problems(prod))
    assert "task readinessProbe: port 50099" in problems
    assert "NetworkPolicy chat-traffic" in problems
    assert "envoy cluster ratelimit" in problems


def test_the_edge_issuer_is_the_public_url(rendered: list[dict[str, Any]]) -> None:
    public = named(rendered, "ConfigMap", "opsmesh-mesh")["data"]["OPSMESH_PUBLIC_URL"]
    text = yaml.safe_dump(envoy_config(rendered))
    assert f"issuer: {public}\n" in text
    assert f"exact: {public}\n" in text  # CORS


def test_prod_pods_are_hardened_and_drain_in_time(prod: list[dict[str, Any]]) -> None:
    assert {name for name, _ in mesh_pods(prod)} == MESH_NAMES
    assert hardening_problems(prod) == []


def test_hardening_check_finds_a_weak_pod(prod: list[dict[str, Any]]) -> None:
    spec = named(prod, "Deployment", "chat")["spec"]["template"]["spec"]
    spec["terminationGracePeriodSeconds"] = 30  # drain 5 + grace 60
    spec["containers"][0]["securityContext"]["readOnlyRootFilesystem"] = False
    env = spec["containers"][0]["env"]
    next(v for v in env if v["name"] == "OPSMESH_AUTH_MODE")["value"] = "trusted-headers"
    problems = "\n".join(hardening_problems(prod))
    assert "terminationGracePeriodSeconds" in problems
    assert "readOnlyRootFilesystem" in problems
    assert "OPSMESH_AUTH_MODE" in problems


def test_prod_runs_two_replicas_autoscaled_with_pinned_images(prod: list[dict[str, Any]]) -> None:
    for name, _ in mesh_pods(prod):
        assert named(prod, "Deployment", name)["spec"]["replicas"] >= 2, name
        assert named(prod, "HorizontalPodAutoscaler", name)["spec"]["minReplicas"] >= 2, name
        assert named(prod, "PodDisruptionBudget", name)["spec"]["minAvailable"] == 1, name
    for _, template in pod_templates(prod):
        for container in template["spec"]["containers"]:
            image = container["image"]
            assert re.search(r":[\w.-]+$|@sha256:", image), image
            assert not image.endswith(":latest"), image
    worker = named(prod, "HorizontalPodAutoscaler", "task-worker")
    assert worker["metadata"]["name"] == "task-worker"
    assert "queue" in (k8s.BASE / "mesh" / "task-worker.yaml").read_text()


def test_dev_runs_one_replica_without_autoscaling() -> None:
    dev = _BUILT.get("dev") or build("dev")
    assert of_kind(dev, "HorizontalPodAutoscaler") == []
    for name, _ in mesh_pods(dev):
        assert named(dev, "Deployment", name)["spec"]["replicas"] == 1
    assert named(dev, "Service", "envoy")["spec"]["type"] == "NodePort"


def _admitted(policy: dict[str, Any], port: int) -> list[dict[str, Any]]:
    return [
        peer
        for rule in policy["spec"].get("ingress", [])
        if not rule.get("ports") or any(p["port"] == port for p in rule["ports"])
        for peer in rule.get("from", [{}])
    ]


def test_ratelimit_is_reachable_only_from_envoy(rendered: list[dict[str, Any]]) -> None:
    ratelimit = next(c for c in k8s.COMPONENTS if c.name == "ratelimit")
    policies = [
        p
        for p in of_kind(rendered, "NetworkPolicy")
        if "Ingress" in p["spec"]["policyTypes"]
        and p["spec"]["podSelector"]
        in ({}, {"matchLabels": {"app.kubernetes.io/name": "ratelimit"}})
    ]
    peers = [peer for p in policies for peer in _admitted(p, ratelimit.grpc_port)]
    assert peers == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "envoy"}}}]
    # Nothing else may send to it either.
    senders = [
        p["metadata"]["name"]
        for p in of_kind(rendered, "NetworkPolicy")
        for rule in p["spec"].get("egress", [])
        for peer in rule.get("to", [])
        if peer.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/name")
        == "ratelimit"
        and any(port["port"] == ratelimit.grpc_port for port in rule.get("ports", []))
    ]
    assert senders == ["envoy-traffic"]
    default = named(rendered, "NetworkPolicy", "default-deny")["spec"]
    assert default == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}


def test_only_the_worker_reaches_the_kubernetes_api(rendered: list[dict[str, Any]]) -> None:
    tokens = {
        name
        for name, template in pod_templates(rendered)
        if template["spec"].get("automountServiceAccountToken", True) and name in MESH_NAMES
    }
    assert tokens == {"task-worker"}
    (role,) = of_kind(rendered, "ClusterRole")
    resources = {r for rule in role["rules"] for r in rule["resources"]}
    assert resources == set(workspace._PLURALS.values()) | {"clusterroles"}
    verbs = {v for rule in role["rules"] for v in rule["verbs"]}
    assert verbs == {"patch", "delete", "bind"}
    delete = [rule for rule in role["rules"] if "delete" in rule["verbs"]]
    assert delete == [
        {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["patch", "delete"]}
    ]
    (binding,) = of_kind(rendered, "ClusterRoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "task-worker", "namespace": "opsmesh"}
    ]


def test_no_secret_with_data_is_committed(rendered: list[dict[str, Any]]) -> None:
    committed = [
        d
        for path in k8s.K8S.rglob("*.y*ml")
        for d in yaml.safe_load_all(path.read_text())
        if isinstance(d, dict)
    ]
    for document in committed + rendered:
        if document.get("kind") == "Secret":
            assert not document.get("data"), document["metadata"]
            assert not document.get("stringData"), document["metadata"]
    referenced = {
        ref["name"]
        for _, template in pod_templates(rendered)
        for c in template["spec"]["containers"]
        for v in c.get("env", [])
        for ref in [v.get("valueFrom", {}).get("secretKeyRef")]
        if ref
    }
    assert {"opsmesh-redis", "opsmesh-nats", "opsmesh-smtp", "opsmesh-clickhouse"} <= referenced
    assert {"opsmesh-alert-webhook"} <= referenced


def test_the_task_stream_and_bucket_run_on_three_jetstream_servers() -> None:
    mesh = Path(__file__).resolve().parent.parent / "deploy" / "k8s" / "base" / "mesh"
    for name in ("task.yaml", "task-worker.yaml"):
        documents = list(yaml.safe_load_all((mesh / name).read_text()))
        (deployment,) = [d for d in documents if d and d["kind"] == "Deployment"]
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        env = {item["name"]: item.get("value") for item in container["env"]}
        assert env["OPSMESH_TASK_REPLICAS"] == "3", name


# --- trust: the edge's credential, the listener, the proxies identity_svc believes ------------


def _secret_ref(container: dict[str, Any], variable: str) -> tuple[str, str] | None:
    for entry in container.get("env", []):
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        if entry["name"] == variable and ref:
            return ref["name"], ref["key"]
    return None


def _ratelimit_metadata(config: dict[str, Any]) -> list[dict[str, str]]:
    (listener,) = config["static_resources"]["listeners"]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    (ratelimit,) = [f for f in manager["http_filters"] if f["name"].endswith(".ratelimit")]
    service = ratelimit["typed_config"]["rate_limit_service"]["grpc_service"]
    metadata: list[dict[str, str]] = service["initial_metadata"]
    return metadata


def test_ratelimit_svc_and_envoy_share_the_edge_credential_from_a_secret(
    rendered: list[dict[str, Any]],
) -> None:
    from ratelimit_svc.edgeauth import EDGE_CREDENTIAL_METADATA, EDGE_CREDENTIAL_VARIABLE

    expected = (k8s.EDGE_SECRET_NAME, "credential")
    ratelimit = named(rendered, "Deployment", "ratelimit")["spec"]["template"]["spec"]
    envoy = named(rendered, "Deployment", "envoy")["spec"]["template"]["spec"]
    assert _secret_ref(ratelimit["containers"][0], EDGE_CREDENTIAL_VARIABLE) == expected
    assert _secret_ref(envoy["containers"][0], EDGE_CREDENTIAL_VARIABLE) == expected
    config = envoy_config(rendered)
    assert _ratelimit_metadata(config) == [
        {"key": EDGE_CREDENTIAL_METADATA, "value": k8s.EDGE_CREDENTIAL_SLOT}
    ]
    listener = config["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert listener["address"] == "0.0.0.0"  # the pod's own address; no Service skips Envoy


def test_the_envoy_pod_writes_the_secret_into_its_config(tmp_path: Path) -> None:
    """The container's own start command, run with the Secret's value in its environment."""
    from ratelimit_svc.edgeauth import EDGE_CREDENTIAL_VARIABLE

    documents = yaml.safe_load_all((k8s.BASE / "edge" / "edge.yaml").read_text())
    deployment = next(d for d in documents if d and d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["/bin/sh", "-c"]
    render_step, _, start = container["args"][0].partition(" && ")
    assert start.startswith("exec envoy -c /tmp/envoy.yaml ")
    (tmp_path / "in.yaml").write_text((k8s.BASE / "edge" / "envoy.yml").read_text())
    script = render_step.replace("/etc/envoy/envoy.yaml", str(tmp_path / "in.yaml"))
    script = script.replace("/tmp/envoy.yaml", str(tmp_path / "out.yaml"))
    credential = "0123456789abcdef" * 4
    subprocess.run(
        ["/bin/sh", "-c", script],
        env={EDGE_CREDENTIAL_VARIABLE: credential, "PATH": "/usr/bin:/bin"},
        check=True,
        timeout=30,
    )
    written = yaml.safe_load((tmp_path / "out.yaml").read_text())
    assert _ratelimit_metadata(written)[0]["value"] == credential


def test_identity_believes_forwarded_addresses_only_from_the_configured_proxies(
    rendered: list[dict[str, Any]],
) -> None:
    values = {(w, name): value for w, name, value in env_values(rendered)}
    assert values[("identity", "OPSMESH_TRUSTED_PROXIES")] == k8s.TRUSTED_PROXIES
    assert not any(name == "OPSMESH_TRUSTED_PROXIES" for w, name in values if w != "identity")


def test_the_dev_edge_listens_on_loopback_unless_moved() -> None:
    source = yaml.safe_load(edge.CONFIG.read_text())
    listener = source["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert listener["address"] == "127.0.0.1"
    moved_topology = edge.EdgeTopology.dev({"edge": 18080}, bind_address="0.0.0.0")
    moved = yaml.safe_load(edge.render(moved_topology))
    listener = moved["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert listener == {"address": "0.0.0.0", "port_value": 18080}
