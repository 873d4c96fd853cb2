"""The pods waiting to start on this node, read from the API server when the kubelet asks."""

from __future__ import annotations

import logging
from typing import Any

from kubernetes import client

from tidal import api
from tidal.kubeclient import read_json
from tidal.node_agent.allocation import PendingAssignment, parse_gpu_annotation

log = logging.getLogger(__name__)


class KubePods:
    """Lists the node's Pending pods (one LIST per kubelet admission: rare, and always fresh,
    which a watch cache could not promise at the instant the extender has just bound)."""

    def __init__(self, kube_api: client.ApiClient, node: str) -> None:
        self.core = client.CoreV1Api(kube_api)
        self.node = node

    def waiting(self) -> list[PendingAssignment]:
        response = self.core.list_pod_for_all_namespaces(
            field_selector=f"spec.nodeName={self.node},status.phase=Pending",
            _preload_content=False,
            _request_timeout=10,
        )
        return assignments(read_json(response).get("items") or [])


def assignments(pods: list[dict[str, Any]]) -> list[PendingAssignment]:
    """The pods tidal placed that the kubelet has not admitted yet. An admitted pod (the kubelet
    has written container statuses) already got its devices; skipping it by its status rather
    than by memory keeps a restarted agent from counting it as still waiting."""
    out = []
    for pod in pods:
        meta = pod["metadata"]
        text = (meta.get("annotations") or {}).get(api.ANNOTATION_GPUS)
        if not text or (pod.get("status") or {}).get("containerStatuses"):
            continue
        try:
            gpus = parse_gpu_annotation(text)
        except ValueError as error:
            log.warning("pod %s/%s: %s", meta["namespace"], meta["name"], error)
            continue
        created = meta.get("creationTimestamp", "")
        out.append(PendingAssignment(meta["namespace"], meta["name"], meta["uid"], gpus, created))
    return out
