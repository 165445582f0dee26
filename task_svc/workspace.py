"""Workspace provisioning: an organization's Kubernetes namespace and its guard rails.

A workspace is a namespace with a resource quota, a limit range, a default-deny
network policy (traffic only inside the namespace, plus DNS), a service account
and a role binding. The handler renders these manifests and applies them with
server-side apply, which is idempotent: applying twice (a redelivered task)
converges to the same objects. Deprovisioning deletes the namespace; a
namespace already gone counts as done.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
from google.protobuf import json_format

from mesh.settings import seconds, setting, string
from opsmesh.task.v1 import task_pb2
from task_svc.handlers import Handler, PermanentError, TaskCancelled, TaskContext

log = logging.getLogger("opsmesh.workspace")

FIELD_MANAGER = "opsmesh-task-worker"
DEFAULT_QUOTA = {"cpu": "4", "memory": "8Gi", "storage": "50Gi", "pods": 50}
_IN_CLUSTER = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def _in_cluster(value: str) -> Callable[[], str]:
    """A default that applies inside a Kubernetes pod (its service account is mounted)."""
    return lambda: value if _IN_CLUSTER.exists() else ""


def _api_url(raw: str) -> str:
    if not raw.startswith(("https://", "http://")):
        raise ValueError("expected an https:// URL")
    return raw.rstrip("/")


@dataclass(frozen=True, kw_only=True)
class KubeSettings:
    api: str = setting(
        "OPSMESH_KUBE_API",
        "",
        _api_url,
        default_factory=_in_cluster("https://kubernetes.default.svc"),
        doc="in a pod: https://kubernetes.default.svc; elsewhere empty: no cluster",
    )
    """The API server URL, e.g. https://kubernetes.default.svc; empty: no cluster."""
    token_file: str = string(
        "OPSMESH_KUBE_TOKEN_FILE",
        default_factory=_in_cluster(str(_IN_CLUSTER / "token")),
        doc="in a pod: the service account's token",
    )
    ca_file: str = string(
        "OPSMESH_KUBE_CA_FILE",
        default_factory=_in_cluster(str(_IN_CLUSTER / "ca.crt")),
        doc="in a pod: the service account's CA",
    )
    timeout: float = seconds("OPSMESH_KUBE_TIMEOUT", 10.0, minimum=0.1, maximum=300)


def namespace_name(org_id: str, workspace: str) -> str:
    """``ws-<workspace>-<org hash>``: a DNS label, unique per organization and workspace."""
    return f"ws-{workspace}-{hashlib.sha256(org_id.encode()).hexdigest()[:8]}"


def render(org_id: str, payload: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The manifests of a workspace, in the order they are applied."""
    workspace = str(payload["workspace"])
    namespace = namespace_name(org_id, workspace)
    quota = {**DEFAULT_QUOTA, **{k: v for k, v in dict(payload.get("quota", {})).items() if v}}
    labels = {
        "app.kubernetes.io/managed-by": "opsmesh",
        "opsmesh.dev/workspace": workspace,
        "opsmesh.dev/org-hash": hashlib.sha256(org_id.encode()).hexdigest()[:16],
    }
    meta = {"namespace": namespace, "labels": labels}
    return [
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": namespace,
                "labels": labels,
                "annotations": {"opsmesh.dev/org-id": org_id},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "ResourceQuota",
            "metadata": {"name": "workspace-quota", **meta},
            "spec": {
                "hard": {
                    "limits.cpu": str(quota["cpu"]),
                    "limits.memory": str(quota["memory"]),
                    "requests.storage": str(quota["storage"]),
                    "pods": str(int(quota["pods"])),
                }
            },
        },
        {
            "apiVersion": "v1",
            "kind": "LimitRange",
            "metadata": {"name": "workspace-limits", **meta},
            "spec": {
                "limits": [
                    {
                        "type": "Container",
                        "default": {"cpu": "500m", "memory": "512Mi"},
                        "defaultRequest": {"cpu": "100m", "memory": "128Mi"},
                    }
                ]
            },
        },
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "workspace-isolation", **meta},
            "spec": {
                "podSelector": {},
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [{"from": [{"podSelector": {}}]}],
                "egress": [
                    {"to": [{"podSelector": {}}]},
                    {
                        "to": [
                            {
                                "namespaceSelector": {
                                    "matchLabels": {"kubernetes.io/metadata.name": "kube-system"}
                                }
                            }
                        ],
                        "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
                    },
                ],
            },
        },
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "workspace", **meta},
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "workspace-edit", **meta},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "edit",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "workspace", "namespace": namespace}],
        },
    ]


_PLURALS = {
    "Namespace": "namespaces",
    "ResourceQuota": "resourcequotas",
    "LimitRange": "limitranges",
    "NetworkPolicy": "networkpolicies",
    "ServiceAccount": "serviceaccounts",
    "RoleBinding": "rolebindings",
}


def resource_path(manifest: Mapping[str, Any]) -> str:
    """The API path of a manifest's object."""
    api_version = str(manifest["apiVersion"])
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    metadata = manifest["metadata"]
    plural = _PLURALS[str(manifest["kind"])]
    if "namespace" in metadata:
        return f"{base}/namespaces/{metadata['namespace']}/{plural}/{metadata['name']}"
    return f"{base}/{plural}/{metadata['name']}"


class KubeClient:
    """The few Kubernetes API calls workspaces need, over HTTPS with a bearer token."""

    def __init__(self, settings: KubeSettings) -> None:
        headers = {}
        if settings.token_file:
            token = Path(settings.token_file).read_text().strip()
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.AsyncClient(
            base_url=settings.api,
            headers=headers,
            verify=settings.ca_file or True,
            timeout=settings.timeout,
        )

    async def apply(self, manifest: Mapping[str, Any]) -> None:
        response = await self._send(
            "PATCH",
            resource_path(manifest),
            params={"fieldManager": FIELD_MANAGER, "force": "true"},
            json=manifest,
            headers={"Content-Type": "application/apply-patch+yaml"},
        )
        _raise_for(response, f"apply {manifest['kind']} {manifest['metadata']['name']}")

    async def delete_namespace(self, name: str) -> bool:
        """Deletes a namespace; False when it did not exist."""
        response = await self._send("DELETE", f"/api/v1/namespaces/{name}")
        if response.status_code == 404:
            return False
        _raise_for(response, f"delete namespace {name}")
        return True

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._http.request(method, path, **kwargs)
        except httpx.TransportError as error:
            # Transient: the worker retries the task with backoff.
            raise ConnectionError(f"Kubernetes API unreachable: {error}") from error

    async def close(self) -> None:
        await self._http.aclose()


def _raise_for(response: httpx.Response, action: str) -> None:
    if response.is_success:
        return
    try:
        detail = str(response.json().get("message", ""))
    except ValueError:
        detail = response.text[:300]
    message = f"{action}: HTTP {response.status_code} {detail}".strip()
    if response.status_code in (409, 429) or response.status_code >= 500:
        raise ConnectionError(message)  # transient: retried
    raise PermanentError(message)


class ProvisioningNotifier(Protocol):
    """Sends the provisioning emails (started, completed, failed) of a workspace task."""

    async def __call__(self, task: task_pb2.Task, template: str, data: dict[str, Any]) -> None: ...


def workspace_handler(kube: KubeClient, notify: ProvisioningNotifier | None = None) -> Handler:
    async def tell(task: task_pb2.Task, stage: str, **data: Any) -> None:
        listed = task.payload.fields.get("notify_emails")
        if notify is None or listed is None or not listed.list_value.values:
            return
        try:
            await notify(task, f"workspace_provisioning_{stage}", data)
        except Exception as error:  # noqa: BLE001 - an email never fails the workspace itself
            log.warning("provisioning email %s for task %s not sent: %s", stage, task.id, error)

    async def provision(context: TaskContext, payload: dict[str, Any]) -> None:
        task = context.task
        workspace = str(payload["workspace"])
        base = {"org_name": task.org_id, "workspace": workspace}
        if context.attempt == 1:
            await tell(task, "started", **base)
        manifests = render(task.org_id, payload)
        try:
            for done, manifest in enumerate(manifests):
                await context.progress(f"apply {manifest['kind']}", done, len(manifests))
                await kube.apply(manifest)
        except TaskCancelled:
            raise
        except Exception as error:
            last = isinstance(error, PermanentError) or task.retry_count + 1 >= task.max_attempts
            if last:
                await tell(task, "failed", **base, error=str(error)[:500])
            raise
        namespace = manifests[0]["metadata"]["name"]
        await context.progress("workspace ready", len(manifests), len(manifests), namespace)
        await tell(task, "completed", **base, namespace=namespace)

    async def provision_or_remove(context: TaskContext) -> None:
        task = context.task
        payload = json_format.MessageToDict(task.payload)
        if payload.get("action") != task_pb2.WorkspaceAction.Name(
            task_pb2.WORKSPACE_ACTION_DEPROVISION
        ):
            await provision(context, payload)
            return
        namespace = namespace_name(task.org_id, str(payload["workspace"]))
        await context.progress(f"delete namespace {namespace}", 0, 1)
        existed = await kube.delete_namespace(namespace)
        await context.progress("deleted" if existed else "already gone", 1, 1, message=namespace)

    return provision_or_remove
