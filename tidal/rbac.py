"""The identity objects every tidal component needs on a cluster: its ServiceAccount and the
binding of its ClusterRole to it (each component defines the role's rules beside its code)."""

from __future__ import annotations

from typing import Any

RBAC_GROUP = "rbac.authorization.k8s.io"


def app_labels(name: str, component: str) -> dict[str, str]:
    """The recommended app.kubernetes.io labels (a fresh dict per object: shared dicts become
    YAML anchors and aliases)."""
    return {
        "app.kubernetes.io/name": name,
        "app.kubernetes.io/part-of": "tidal",
        "app.kubernetes.io/component": component,
    }


def service_account(name: str, namespace: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
    }


def cluster_role_binding(name: str, namespace: str, labels: dict[str, str]) -> dict[str, Any]:
    """Binds ClusterRole ``name`` to ServiceAccount ``namespace/name``."""
    return {
        "apiVersion": f"{RBAC_GROUP}/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": name, "labels": dict(labels)},
        "roleRef": {"apiGroup": RBAC_GROUP, "kind": "ClusterRole", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
    }


def cluster_role(name: str, labels: dict[str, str], rules: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": f"{RBAC_GROUP}/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name, "labels": dict(labels)},
        "rules": rules,
    }


def role_binding(
    name: str, namespace: str, labels: dict[str, str], cluster_role: str, account: str
) -> dict[str, Any]:
    """Binds ClusterRole ``cluster_role`` to ServiceAccount ``namespace/account`` in
    ``namespace`` only: one role defined once, granted namespace by namespace."""
    return {
        "apiVersion": f"{RBAC_GROUP}/v1",
        "kind": "RoleBinding",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
        "roleRef": {"apiGroup": RBAC_GROUP, "kind": "ClusterRole", "name": cluster_role},
        "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}],
    }
