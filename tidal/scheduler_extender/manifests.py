"""The extender's identity on a cluster: ServiceAccount, least-privilege ClusterRole, binding
(``tidal extender-rbac`` prints them; the dev cluster runs its extender with exactly these).

The rules are the API calls the extender makes: list+watch what its cache mirrors (nodes, pods,
PodDisruptionBudgets, GPUTopology objects); read and annotate pods (``tidal.dev/gpus``, the
reservation); bind them; mark victims (the DisruptionTarget condition on pods/status), evict
them through the Eviction API (PDBs enforced by the API server) and record Events.
"""

from __future__ import annotations

from typing import Any

from tidal import api
from tidal import rbac as identity

NAME = "tidal-extender"
LABELS = identity.app_labels(NAME, "scheduler-extender")


def cluster_role() -> dict[str, Any]:
    watch = ["list", "watch"]
    return identity.cluster_role(
        NAME,
        LABELS,
        [
            {"apiGroups": [""], "resources": ["nodes"], "verbs": watch},
            {"apiGroups": [""], "resources": ["pods"], "verbs": [*watch, "get", "patch"]},
            {"apiGroups": [""], "resources": ["bindings"], "verbs": ["create"]},
            {"apiGroups": [""], "resources": ["pods/status"], "verbs": ["patch"]},
            {"apiGroups": [""], "resources": ["pods/eviction"], "verbs": ["create"]},
            {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
            {"apiGroups": ["policy"], "resources": ["poddisruptionbudgets"], "verbs": watch},
            {"apiGroups": [api.GROUP], "resources": [api.PLURAL_GPUTOPOLOGIES], "verbs": watch},
        ],
    )


def rbac(namespace: str) -> list[dict[str, Any]]:
    return [
        identity.service_account(NAME, namespace, LABELS),
        cluster_role(),
        identity.cluster_role_binding(NAME, namespace, LABELS),
    ]
