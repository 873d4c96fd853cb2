"""Fake GPU nodes from topology presets (Node manifests KWOK will manage), and GPU pods for them."""

from __future__ import annotations

from typing import Any

from tidal import api
from tidal.topology import load_preset

KWOK_ANNOTATION = "kwok.x-k8s.io/node"
KWOK_SELECTOR = f"{KWOK_ANNOTATION}=fake"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
# On a pod whose kubelet is played elsewhere (e2e/pod_process.py): KWOK's pod stages leave it
# alone (kwok-stages.yaml).
KWOK_EXTERNAL_ANNOTATION = api.PREFIX + "kwok-external"
# Host memory per GPU on the fake nodes; real GPU servers carry 1–2 TiB for 8 GPUs.
_HOST_MEMORY_GIB_PER_GPU = 128


def gpu_node(name: str, preset: str) -> dict[str, Any]:
    """A Node with the preset's GPUs as ``nvidia.com/gpu`` capacity, its cores and memory, the
    labels tidal and GPU feature discovery set, and the KWOK annotation.

    Status is set at creation (as a kubelet does when it registers), so the scheduler sees the
    capacity before KWOK's first update.
    """
    topology = load_preset(preset)
    cores = sum(topology.cpu_cores().values())
    memory_gib = max(1, topology.gpu_count) * _HOST_MEMORY_GIB_PER_GPU
    resources = {
        "cpu": str(cores),
        "memory": f"{memory_gib}Gi",
        "pods": "110",
        api.GPU_RESOURCE: str(topology.gpu_count),
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {KWOK_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                api.LABEL_TOPOLOGY_PRESET: preset,
                GPU_PRODUCT_LABEL: topology.gpu_model.replace(" ", "-"),
                "nvidia.com/gpu.count": str(topology.gpu_count),
            },
        },
        "spec": {},
        "status": {"capacity": resources, "allocatable": dict(resources)},
    }


def node_names(count: int, presets: list[str], prefix: str = "gpu-node") -> list[tuple[str, str]]:
    """``count`` (name, preset) pairs cycling through ``presets``; names are stable so a
    re-run finds the same nodes."""
    if not presets:
        raise ValueError("presets: give at least one topology preset")
    return [(f"{prefix}-{i:05d}", presets[i % len(presets)]) for i in range(count)]


def gpu_pod(
    name: str,
    gpus: int,
    *,
    scheduler: str = api.SCHEDULER_NAME,
    annotations: dict[str, str] | None = None,
    memory: str = "1Gi",
) -> dict[str, Any]:
    """A minimal pod asking for ``gpus`` whole GPUs (KWOK never runs its image)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations or {}},
        "spec": {
            "schedulerName": scheduler,
            "terminationGracePeriodSeconds": 0,
            "containers": [
                {
                    "name": "worker",
                    "image": "tidal/worker:fake",
                    "resources": {
                        "requests": {"cpu": "1", "memory": memory},
                        "limits": {api.GPU_RESOURCE: str(gpus)},
                    },
                }
            ],
        },
    }
