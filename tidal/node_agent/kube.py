"""The pods waiting to start on this node, read from the API server when the kubelet asks."""

from __future__ import annotations

import logging

from kubernetes import client

from tidal.kubeclient import read_json
from tidal.node_agent.allocation import ANNOTATION_GPUS, Assignment, parse_gpu_annotation

log = logging.getLogger(__name__)


class KubePods:
    """Lists the node's Pending pods (one LIST per kubelet admission: rare, and always fresh,
    which a watch cache could not promise at the instant the extender has just bound)."""

    def __init__(self, api: client.ApiClient, node: str) -> None:
        self.core = client.CoreV1Api(api)
        self.node = node

    def waiting(self) -> list[Assignment]:
        response = self.core.list_pod_for_all_namespaces(
            field_selector=f"spec.nodeName={self.node},status.phase=Pending",
            _preload_content=False,
            _request_timeout=10,
        )
        out = []
        for pod in read_json(response).get("items") or []:
            meta = pod["metadata"]
            text = (meta.get("annotations") or {}).get(ANNOTATION_GPUS)
            if not text:
                continue
            try:
                gpus = parse_gpu_annotation(text)
            except ValueError as error:
                log.warning("pod %s/%s: %s", meta["namespace"], meta["name"], error)
                continue
            out.append(
                Assignment(
                    meta["namespace"],
                    meta["name"],
                    meta["uid"],
                    gpus,
                    meta.get("creationTimestamp", ""),
                )
            )
        return out
