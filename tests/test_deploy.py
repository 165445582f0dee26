"""The Kubernetes manifests under deploy/k8s are valid objects of the API they target."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "k8s"
MANIFESTS = sorted(p for p in DEPLOY.rglob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("path", MANIFESTS, ids=[str(p.relative_to(DEPLOY)) for p in MANIFESTS])
def test_manifests_validate_against_kubernetes_schemas(path: Path) -> None:
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert documents
    for document in documents:
        kubernetes_validate.validate(document, "1.37.0", strict=True)


def test_kustomizations_list_files_that_exist() -> None:
    for kustomization in DEPLOY.rglob("kustomization.yaml"):
        listed = yaml.safe_load(kustomization.read_text()).get("resources", [])
        for resource in listed:
            assert (kustomization.parent / resource).exists(), f"{kustomization}: {resource}"


def test_ollama_runs_on_gpu_nodes_and_is_ready_when_its_api_answers() -> None:
    documents = list(yaml.safe_load_all((DEPLOY / "base" / "ollama" / "ollama.yaml").read_text()))
    deployment = next(d for d in documents if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/api/tags"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "ollama-models"
    assert pod["initContainers"][0]["name"] == "pull-models"


def test_config_maps_that_pods_read_are_part_of_the_base() -> None:
    documents = [d for path in MANIFESTS for d in yaml.safe_load_all(path.read_text()) if d]
    config_maps = {d["metadata"]["name"]: d for d in documents if d["kind"] == "ConfigMap"}
    for document in documents:
        if document["kind"] != "Deployment":
            continue
        pod = document["spec"]["template"]["spec"]
        for container in pod.get("initContainers", []) + pod["containers"]:
            for variable in container.get("env", []):
                ref = variable.get("valueFrom", {}).get("configMapKeyRef")
                if ref:
                    assert ref["key"] in config_maps[ref["name"]]["data"]


def test_the_cluster_gets_the_alert_rules_the_dev_stack_loads() -> None:
    from devtools.servers import MESH_RULES

    kustomization = DEPLOY / "base" / "monitoring" / "kustomization.yaml"
    (generator,) = yaml.safe_load(kustomization.read_text())["configMapGenerator"]
    shipped = [kustomization.parent / name for name in generator["files"]]
    assert [path.resolve() for path in shipped] == [MESH_RULES.resolve()]
    groups = yaml.safe_load(MESH_RULES.read_text())["groups"]
    alerts = {rule["alert"] for group in groups for rule in group["rules"]}
    assert {"OpsmeshServiceDown", "OpsmeshTaskDeadLetters", "OpsmeshEmailDeliveryFailing"} <= alerts
