"""The operator's Kubernetes calls (official client, raw JSON): pods, status, scale, installs."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from kubernetes import client

from tidal import api
from tidal.kubeclient import KubeApiError, call, discard, read_json
from tidal.operator.manifests import manifests, worker_identity

log = logging.getLogger(__name__)
PLURALS = {
    api.KIND_LLMSERVICE: api.PLURAL_LLMSERVICES,
    api.KIND_LLMBATCHJOB: api.PLURAL_LLMBATCHJOBS,
}


def _json(response: Any) -> Any:
    return read_json(response)


def _gpus_requested(pod: dict[str, Any]) -> int:
    total = 0
    for container in pod.get("spec", {}).get("containers") or ():
        limits = (container.get("resources") or {}).get("limits") or {}
        total += int(limits.get(api.GPU_RESOURCE, 0))
    return total


class OperatorKube:
    def __init__(self, kube_api: client.ApiClient) -> None:
        self.api = kube_api
        self.core = client.CoreV1Api(kube_api)
        self.custom = client.CustomObjectsApi(kube_api)
        self.rbac = client.RbacAuthorizationV1Api(kube_api)

    def _call(self, what: str, action: Callable[[], Any], ok: Iterable[int] = ()) -> Any:
        """``call``, with the statuses in ``ok`` (such as 404 for a read) answered None."""
        try:
            return call(what, action)
        except KubeApiError as error:
            if error.status in tuple(ok):
                return None
            raise

    # -- the custom objects ------------------------------------------------------------------
    def get_object(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        response = self._call(
            f"get {kind} {namespace}/{name}",
            lambda: self.custom.get_namespaced_custom_object(
                api.GROUP, api.VERSION, namespace, PLURALS[kind], name, _preload_content=False
            ),
            ok=(404,),
        )
        return None if response is None else _json(response)

    def patch_status(self, kind: str, namespace: str, name: str, status: dict[str, Any]) -> None:
        self._call(
            f"update status of {kind} {namespace}/{name}",
            lambda: self.custom.patch_namespaced_custom_object_status(
                api.GROUP, api.VERSION, namespace, PLURALS[kind], name, {"status": status}
            ),
            ok=(404,),
        )

    def set_replicas(self, namespace: str, name: str, replicas: int) -> None:
        self._call(
            f"scale LLMService {namespace}/{name}",
            lambda: self.custom.patch_namespaced_custom_object(
                api.GROUP,
                api.VERSION,
                namespace,
                api.PLURAL_LLMSERVICES,
                name,
                {"spec": {"replicas": replicas}},
            ),
        )

    # -- the workers' identity -----------------------------------------------------------
    def ensure_worker_identity(self, namespace: str) -> None:
        """Create the workers' ServiceAccount and RoleBinding in ``namespace``; existing ones
        (a 409) are kept as they are."""
        creators: dict[str, Callable[[dict[str, Any]], Any]] = {
            "ServiceAccount": lambda body: self.core.create_namespaced_service_account(
                namespace, body, _preload_content=False
            ),
            "RoleBinding": lambda body: self.rbac.create_namespaced_role_binding(
                namespace, body, _preload_content=False
            ),
        }
        for obj in worker_identity(namespace):
            kind, name = obj["kind"], obj["metadata"]["name"]
            create = functools.partial(creators[kind], obj)
            discard(self._call(f"create {kind} {namespace}/{name}", create, ok=(409,)))

    # -- pods ---------------------------------------------------------------------------------
    def owned_pods(self, label: str, namespace: str, name: str) -> list[dict[str, Any]]:
        response = self._call(
            f"list pods of {namespace}/{name}",
            lambda: self.core.list_namespaced_pod(
                namespace, label_selector=f"{label}={name}", _preload_content=False
            ),
        )
        items: list[dict[str, Any]] = _json(response)["items"]
        return items

    def namespace_pods(self, namespace: str) -> list[dict[str, Any]]:
        response = self._call(
            f"list pods in {namespace}",
            lambda: self.core.list_namespaced_pod(namespace, _preload_content=False),
        )
        items: list[dict[str, Any]] = _json(response)["items"]
        return items

    def create_pod(self, pod: dict[str, Any]) -> bool:
        """Create ``pod``; False when one of that name exists already (a repeated plan)."""
        namespace = pod["metadata"]["namespace"]
        created = self._call(
            f"create pod {namespace}/{pod['metadata']['name']}",
            lambda: self.core.create_namespaced_pod(namespace, pod, _preload_content=False),
            ok=(409,),
        )
        discard(created)
        return created is not None

    def delete_pod(self, namespace: str, name: str, grace_s: int | None = None) -> None:
        """Delete a pod; ``grace_s`` 0 for one on a deleted node (no kubelet to confirm)."""
        extra = {} if grace_s is None else {"grace_period_seconds": grace_s}
        discard(
            self._call(
                f"delete pod {namespace}/{name}",
                lambda: self.core.delete_namespaced_pod(
                    name, namespace, _preload_content=False, **extra
                ),
                ok=(404,),
            )
        )

    def pods_on_node(self, node: str) -> list[dict[str, Any]]:
        response = self._call(
            f"list pods on {node}",
            lambda: self.core.list_pod_for_all_namespaces(
                field_selector=f"spec.nodeName={node}", _preload_content=False
            ),
        )
        items: list[dict[str, Any]] = _json(response)["items"]
        return items

    def node_free_gpus(self, nodes: Iterable[str]) -> dict[str, int]:
        """Allocatable GPUs minus those requested by unfinished pods, for each of ``nodes``."""
        free = {}
        for node in set(nodes):
            body = self._call(
                f"get node {node}",
                lambda node=node: self.core.read_node(node, _preload_content=False),  # type: ignore[misc]
                ok=(404,),
            )
            if body is None:
                continue
            allocatable = _json(body)["status"].get("allocatable", {})
            pods = _json(
                self._call(
                    f"list pods on {node}",
                    lambda node=node: self.core.list_pod_for_all_namespaces(  # type: ignore[misc]
                        field_selector=f"spec.nodeName={node}", _preload_content=False
                    ),
                )
            )["items"]
            used = sum(
                _gpus_requested(p)
                for p in pods
                if p.get("status", {}).get("phase") not in ("Succeeded", "Failed")
            )
            free[node] = int(allocatable.get(api.GPU_RESOURCE, 0)) - used
        return free


def install(
    kube_api: client.ApiClient,
    timeout_s: float = 60.0,
    extra_priority_classes: tuple[str, ...] = (),
) -> list[str]:
    """Create or update the CRDs, PriorityClasses, the operator's and the workers' ClusterRoles
    and the workers' admission policy with its binding; wait until
    the CRDs are established. Returns what was applied, as "Kind/name".
    ``extra_priority_classes`` widen the CRDs' priorityClassName enum (the operator must be
    run with the same list)."""
    applied = []
    for manifest in manifests(extra_priority_classes):
        _apply(kube_api, manifest)
        applied.append(f"{manifest['kind']}/{manifest['metadata']['name']}")
    extensions = client.ApiextensionsV1Api(kube_api)
    deadline = time.monotonic() + timeout_s
    for manifest in manifests(extra_priority_classes):
        if manifest["kind"] != "CustomResourceDefinition":
            continue
        name = manifest["metadata"]["name"]
        while not _established(extensions.read_custom_resource_definition(name)):
            if time.monotonic() > deadline:
                raise KubeApiError(0, f"CRD {name} not established after {timeout_s:.0f} s")
            time.sleep(0.2)
    return applied


def _established(crd: Any) -> bool:
    conditions = (crd.status and crd.status.conditions) or []
    return any(c.type == "Established" and c.status == "True" for c in conditions)


def _apply(kube_api: client.ApiClient, manifest: dict[str, Any]) -> None:
    """Server-side apply, so re-running an install updates what changed and nothing else."""
    kind, name = manifest["kind"], manifest["metadata"]["name"]
    admission = client.AdmissionregistrationV1Api(kube_api)
    patchers: dict[str, Callable[..., Any]] = {
        "CustomResourceDefinition": client.ApiextensionsV1Api(
            kube_api
        ).patch_custom_resource_definition,
        "PriorityClass": client.SchedulingV1Api(kube_api).patch_priority_class,
        "ClusterRole": client.RbacAuthorizationV1Api(kube_api).patch_cluster_role,
        "ValidatingAdmissionPolicy": admission.patch_validating_admission_policy,
        "ValidatingAdmissionPolicyBinding": admission.patch_validating_admission_policy_binding,
    }
    response = call(
        f"apply {kind}/{name}",
        lambda: patchers[kind](
            name,
            manifest,
            field_manager="tidal-operator",
            force=True,
            _content_type="application/apply-patch+yaml",  # JSON is YAML
            _preload_content=False,
        ),
    )
    discard(response)
