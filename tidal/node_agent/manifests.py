"""What runs the node agent on a cluster: its ServiceAccount, least-privilege ClusterRole and
binding, and the DaemonSet (``tidal node-agent manifests`` prints them, for kubectl or a chart).

The ClusterRole lists exactly the API calls the agent makes: read its Node (the owner
reference's uid) and label it; server-side apply its GPUTopology and the status heartbeat
(an apply that creates the object is authorised as a create as well); list the pods bound to
its node when the kubelet asks for devices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tidal import __version__, api
from tidal import rbac as identity

NAME = "tidal-node-agent"
PLUGIN_DIR = "/var/lib/kubelet/device-plugins"
LABELS = identity.app_labels(NAME, "node-agent")


def _labels() -> dict[str, str]:
    return dict(LABELS)  # a fresh dict per object, or YAML writes anchors and aliases


@dataclass(frozen=True)
class AgentDeployment:
    """The settings a cluster administrator picks; defaults fit a GPU Operator cluster."""

    namespace: str = "tidal-system"
    # the registry of the operator's worker image; nothing is published there yet: build your own
    image: str = f"ghcr.io/tidal-llm/tidal:{__version__}"
    # GPU Feature Discovery's label; every node with an NVIDIA GPU carries it
    node_selector: dict[str, str] = field(
        default_factory=lambda: {"nvidia.com/gpu.present": "true"}
    )
    resource: str = api.GPU_RESOURCE
    metrics_port: int = 9402
    runtime_class: str | None = "nvidia"  # the runtime that mounts the driver and /dev/nvidia*


def cluster_role() -> dict[str, Any]:
    return identity.cluster_role(
        NAME,
        LABELS,
        [
            {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]},
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
            {
                "apiGroups": [api.GROUP],
                "resources": [api.PLURAL_GPUTOPOLOGIES],
                "verbs": ["create", "patch"],
            },
            {"apiGroups": [api.GROUP], "resources": ["gputopologies/status"], "verbs": ["patch"]},
        ],
    )


def daemon_set(settings: AgentDeployment) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": NAME, "namespace": settings.namespace, "labels": _labels()},
        "spec": {
            "selector": {"matchLabels": {"app.kubernetes.io/name": NAME}},
            # one node at a time: a node without its agent gets no new GPU pods admitted
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": _labels()},
                "spec": _pod_spec(settings),
            },
        },
    }


def _pod_spec(settings: AgentDeployment) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "serviceAccountName": NAME,
        # the device plugin is on every GPU pod's admission path: never evict it for pressure
        "priorityClassName": "system-node-critical",
        "nodeSelector": dict(settings.node_selector),
        "tolerations": [
            {"key": settings.resource, "operator": "Exists", "effect": "NoSchedule"},
            {"key": "CriticalAddonsOnly", "operator": "Exists"},
        ],
        # Root, explicitly: the image runs as a non-root user, and the kubelet's device-plugin
        # directory (where the agent creates its socket) is root-owned. No capability, no
        # privilege: root here can write that directory and little else.
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": False,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [_container(settings)],
        "volumes": [
            {"name": "device-plugins", "hostPath": {"path": PLUGIN_DIR, "type": "Directory"}}
        ],
    }
    if settings.runtime_class:
        spec["runtimeClassName"] = settings.runtime_class
    return spec


def _container(settings: AgentDeployment) -> dict[str, Any]:
    return {
        "name": "node-agent",
        "image": settings.image,
        "command": ["tidal", "node-agent", "run"],
        "env": [
            {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            {"name": "TIDAL_GPU_RESOURCE", "value": settings.resource},
            {"name": "TIDAL_DEVICE_PLUGIN_DIR", "value": PLUGIN_DIR},
            {"name": "TIDAL_NODE_AGENT_METRICS_PORT", "value": str(settings.metrics_port)},
            # NVML needs the driver library and every GPU's device node, not the GPUs' use
            {"name": "NVIDIA_VISIBLE_DEVICES", "value": "all"},
            {"name": "NVIDIA_DRIVER_CAPABILITIES", "value": "utility"},
        ],
        "ports": [{"name": "metrics", "containerPort": settings.metrics_port}],
        "resources": {
            "requests": {"cpu": "50m", "memory": "128Mi"},
            "limits": {"memory": "512Mi"},
        },
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
        },
        "volumeMounts": [{"name": "device-plugins", "mountPath": PLUGIN_DIR}],
    }


def manifests(settings: AgentDeployment) -> list[dict[str, Any]]:
    """Everything to apply, in order (the GPUTopology CRD comes with the operator's CRDs)."""
    return [
        identity.service_account(NAME, settings.namespace, LABELS),
        cluster_role(),
        identity.cluster_role_binding(NAME, settings.namespace, LABELS),
        daemon_set(settings),
    ]
