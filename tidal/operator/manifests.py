"""What the operator needs installed beside its CRDs (pure): the PriorityClasses its pods
name, kopf's peering CRD, and its least-privilege ClusterRole, ServiceAccount and binding.
``manifests`` is everything ``tidal operator install-crds`` applies, the CRDs first."""

from __future__ import annotations

from typing import Any

from tidal import api
from tidal.operator.crds import custom_resource_definitions
from tidal.rbac import app_labels, cluster_role, cluster_role_binding, service_account

OPERATOR = "tidal-operator"  # its ServiceAccount, ClusterRole and binding


def priority_classes() -> list[dict[str, Any]]:
    """Online services preempt; batch work never does (it waits for the tide to go out)."""
    return [
        {
            "apiVersion": "scheduling.k8s.io/v1",
            "kind": "PriorityClass",
            "metadata": {"name": api.PRIORITY_CLASS_ONLINE},
            "value": 1_000_000,
            "preemptionPolicy": "PreemptLowerPriority",
            "description": "tidal online LLM services: may preempt batch work.",
        },
        {
            "apiVersion": "scheduling.k8s.io/v1",
            "kind": "PriorityClass",
            "metadata": {"name": api.PRIORITY_CLASS_BATCH},
            "value": 1_000,
            "preemptionPolicy": "Never",
            "description": "tidal offline LLM batch jobs: preemptible, never preempt.",
        },
    ]


def operator_cluster_role() -> dict[str, Any]:
    """Least privilege for ``tidal operator run``."""
    tidal_resources = [api.PLURAL_LLMSERVICES, api.PLURAL_LLMBATCHJOBS]
    return cluster_role(
        OPERATOR,
        app_labels(OPERATOR, "operator"),
        [
            {
                "apiGroups": [api.GROUP],
                "resources": tidal_resources,
                "verbs": ["get", "list", "watch", "patch", "update"],
            },
            {
                "apiGroups": [api.GROUP],
                "resources": [f"{r}/status" for r in tidal_resources],
                "verbs": ["get", "patch", "update"],
            },
            {
                "apiGroups": [api.GROUP],
                "resources": [api.PLURAL_GPUTOPOLOGIES],
                "verbs": ["get", "list", "watch"],
            },
            {
                "apiGroups": [""],
                "resources": ["pods"],
                "verbs": ["get", "list", "watch", "create", "delete"],
            },
            {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]},
            {
                "apiGroups": ["", "events.k8s.io"],
                "resources": ["events"],
                "verbs": ["create", "patch"],
            },
            # kopf peering (leader election between operator replicas) and CRD discovery.
            {
                "apiGroups": ["kopf.dev"],
                "resources": ["clusterkopfpeerings", "kopfpeerings"],
                "verbs": ["get", "list", "watch", "patch"],
            },
            {
                "apiGroups": ["apiextensions.k8s.io"],
                "resources": ["customresourcedefinitions"],
                "verbs": ["get", "list", "watch"],
            },
            {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list", "watch"]},
            {
                "apiGroups": ["scheduling.k8s.io"],
                "resources": ["priorityclasses"],
                "verbs": ["get", "create"],
            },
        ],
    )


def kopf_peering_crd() -> dict[str, Any]:
    """kopf's ClusterKopfPeering, where operator replicas see each other (``--peering``):
    the one with the highest priority works, the others wait."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "clusterkopfpeerings.kopf.dev"},
        "spec": {
            "group": "kopf.dev",
            "scope": "Cluster",
            "names": {
                "kind": "ClusterKopfPeering",
                "plural": "clusterkopfpeerings",
                "singular": "clusterkopfpeering",
            },
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "status": {
                                    "type": "object",
                                    "x-kubernetes-preserve-unknown-fields": True,
                                },
                            },
                        }
                    },
                }
            ],
        },
    }


def operator_identity(namespace: str) -> list[dict[str, Any]]:
    """The operator's ServiceAccount and its binding to :func:`operator_cluster_role`."""
    labels = app_labels(OPERATOR, "operator")
    return [
        service_account(OPERATOR, namespace, labels),
        cluster_role_binding(OPERATOR, namespace, labels),
    ]


def manifests(extra_priority_classes: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Everything the operator needs installed before it runs."""
    return [
        *custom_resource_definitions(extra_priority_classes),
        kopf_peering_crd(),
        *priority_classes(),
        operator_cluster_role(),
    ]
