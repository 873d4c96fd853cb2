"""Publishing what the agent found: one GPUTopology object per node, node labels, a heartbeat.

The object and labels are built by pure functions; :class:`Publisher` applies them with
server-side apply (field manager ``tidal-node-agent``), so a restarted agent converges on the
same object and fields other managers own are left alone.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kubernetes import client

from tidal import api
from tidal.kubeclient import KubeApiError, call, discard, read_json
from tidal.node_agent.facts import (
    GpuSample,
    NodeFacts,
    matching_preset,
    topology_class,
    topology_spec,
)
from tidal.topology import NodeShape, NodeTopology, build_topology, compile_shape

FIELD_MANAGER = "tidal-node-agent"
MANAGED_BY = "app.kubernetes.io/managed-by"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Discovery:
    """The facts of one node and everything derived from them once."""

    node: str
    facts: NodeFacts
    spec: dict[str, Any]
    topology: NodeTopology
    shape: NodeShape
    preset: str | None
    topology_class: str

    @staticmethod
    def of(node: str, facts: NodeFacts) -> Discovery:
        spec = topology_spec(facts, name=facts.preset or f"{node}-discovered")
        topology = build_topology(spec, source=f"topology discovered on {node}")
        preset = facts.preset or matching_preset(topology)
        if preset and not facts.preset:
            spec["name"] = preset
        shape = compile_shape(topology)
        return Discovery(node, facts, spec, topology, shape, preset, topology_class(topology))


def label_value(text: str) -> str:
    """``text`` as a valid label value: 63 characters of [A-Za-z0-9._-], alphanumeric ends."""
    value = re.sub(r"[^A-Za-z0-9._-]+", "-", text)[:63]
    return value.strip("._-")


def node_labels(discovery: Discovery) -> dict[str, str]:
    facts = discovery.facts
    labels = {
        api.LABEL_GPU_MODEL: label_value(facts.gpu_model),
        api.LABEL_GPU_COUNT: str(len(facts.gpus)),
        api.LABEL_TOPOLOGY_CLASS: discovery.topology_class,
    }
    if facts.rack_domain:
        labels[api.LABEL_NVLINK_DOMAIN] = label_value(facts.rack_domain.name)
    return labels


def gpu_topology(discovery: Discovery, node_uid: str) -> dict[str, Any]:
    """The GPUTopology object for the node (spec and metadata; status goes separately)."""
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND_GPUTOPOLOGY,
        "metadata": {
            "name": discovery.node,
            "labels": {MANAGED_BY: FIELD_MANAGER, **node_labels(discovery)},
            # Deleting the Node deletes its topology (garbage collector).
            "ownerReferences": [
                {"apiVersion": "v1", "kind": "Node", "name": discovery.node, "uid": node_uid}
            ],
        },
        "spec": discovery.spec,
    }


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def topology_status(
    discovery: Discovery, samples: Sequence[GpuSample], now: str | None = None
) -> dict[str, Any]:
    facts = discovery.facts
    health = {s.index: s for s in samples}
    devices = []
    for gpu in facts.gpus:
        sample = health.get(gpu.index)
        device = {
            "index": gpu.index,
            "uuid": gpu.uuid,
            "pciBusId": gpu.pci_bus_id,
            "numaNode": gpu.numa_node,
            "memoryMiB": gpu.memory_mib,
            "healthy": bool(sample and sample.healthy),
        }
        if sample and sample.reason:
            device["reason"] = sample.reason
        devices.append(device)
    status = {
        "gpuCount": len(facts.gpus),
        "healthyGPUs": ",".join(str(d["index"]) for d in devices if d["healthy"]),
        "devices": devices,
        "driverVersion": facts.driver_version,
        "cudaVersion": facts.cuda_version,
        "topologyClass": discovery.topology_class,
        "source": facts.source,
        "observedAt": now or _now(),
    }
    if discovery.preset:
        status["preset"] = discovery.preset
    return {"apiVersion": api.API_VERSION, "kind": api.KIND_GPUTOPOLOGY,
            "metadata": {"name": discovery.node}, "status": status}  # fmt: skip


class Publisher:
    """Applies the node's GPUTopology, its status (the heartbeat) and the node labels."""

    def __init__(self, kube_api: client.ApiClient) -> None:
        self.core = client.CoreV1Api(kube_api)
        self.custom = client.CustomObjectsApi(kube_api)
        self._node_uid: str | None = None

    def _node_uid_of(self, node: str) -> str:
        if self._node_uid is None:
            try:
                response = call(
                    f"read node {node}", lambda: self.core.read_node(node, _preload_content=False)
                )
            except KubeApiError as error:
                if error.status == 404:
                    raise KubeApiError(
                        404,
                        f"node {node!r} does not exist: set --node-name (in a DaemonSet, from "
                        "spec.nodeName through the downward API)",
                    ) from error
                raise
            self._node_uid = read_json(response)["metadata"]["uid"]
        return self._node_uid

    def publish(self, discovery: Discovery) -> None:
        """The object and the labels; call again when the facts change."""
        body = gpu_topology(discovery, self._node_uid_of(discovery.node))
        self._apply(discovery.node, body, self.custom.patch_cluster_custom_object)
        labels = {"metadata": {"labels": node_labels(discovery)}}
        call(f"label node {discovery.node}", lambda: self.core.patch_node(discovery.node, labels))

    def heartbeat(self, discovery: Discovery, samples: Sequence[GpuSample]) -> None:
        body = topology_status(discovery, samples)
        self._apply(discovery.node, body, self.custom.patch_cluster_custom_object_status)

    def _apply(self, node: str, body: dict[str, Any], patch: Any) -> None:
        response = call(
            f"apply GPUTopology {node}",
            lambda: patch(
                api.GROUP,
                api.VERSION,
                api.PLURAL_GPUTOPOLOGIES,
                node,
                body,
                field_manager=FIELD_MANAGER,
                force=True,
                _content_type="application/apply-patch+yaml",  # JSON is YAML
                _preload_content=False,
            ),
        )
        discard(response)
