"""The extender's identity on a cluster: ServiceAccount, least-privilege ClusterRole, binding
(``tidal extender-rbac`` prints them; the dev cluster runs its extender with exactly these).

The rules are the API calls the extender makes: list+watch what its cache mirrors (nodes, pods,
PodDisruptionBudgets, GPUTopology objects); read and annotate pods (``tidal.dev/gpus``, the
reservation); bind them; mark victims (the DisruptionTarget condition on pods/status), evict
them through the Eviction API (PDBs enforced by the API server) and record Events.
"""

from __future__ import annotations

from typing import Any

NAME = "tidal-extender"
LABELS = {
    "app.kubernetes.io/name": NAME,
    "app.kubernetes.io/part-of": "tidal",
    "app.kubernetes.io/component": "scheduler-extender",
}


def cluster_role() -> dict[str, Any]:
    watch = ["list", "watch"]
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": NAME, "labels": dict(LABELS)},
        "rules": [
            {"apiGroups": [""], "resources": ["nodes"], "verbs": watch},
            {"apiGroups": [""], "resources": ["pods"], "verbs": [*watch, "get", "patch"]},
            {"apiGroups": [""], "resources": ["bindings"], "verbs": ["create"]},
            {"apiGroups": [""], "resources": ["pods/status"], "verbs": ["patch"]},
            {"apiGroups": [""], "resources": ["pods/eviction"], "verbs": ["create"]},
            {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
            {"apiGroups": ["policy"], "resources": ["poddisruptionbudgets"], "verbs": watch},
            {"apiGroups": ["tidal.dev"], "resources": ["gputopologies"], "verbs": watch},
        ],
    }


def service_account(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": NAME, "namespace": namespace, "labels": dict(LABELS)},
    }


def cluster_role_binding(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": NAME, "labels": dict(LABELS)},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": NAME},
        "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": namespace}],
    }


def rbac(namespace: str) -> list[dict[str, Any]]:
    return [service_account(namespace), cluster_role(), cluster_role_binding(namespace)]
