"""The local control plane is the real thing: versions, CEL validation, scheduling, KWOK."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from e2e.conftest import NODE_COUNT, NODE_PRESETS
from e2e.helpers import wait_for
from tidal.api import LABEL_TOPOLOGY_PRESET
from tidal.devcluster.binaries import K8S_VERSION
from tidal.devcluster.nodes import gpu_pod

WIDGET_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.e2e.tidal.dev"},
    "spec": {
        "group": "e2e.tidal.dev",
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "properties": {
                                    "minReplicas": {"type": "integer", "minimum": 0},
                                    "maxReplicas": {"type": "integer", "minimum": 0},
                                },
                                "x-kubernetes-validations": [
                                    {
                                        "rule": "self.minReplicas <= self.maxReplicas",
                                        "message": "minReplicas must not exceed maxReplicas",
                                        "fieldPath": ".minReplicas",
                                    }
                                ],
                            }
                        },
                    }
                },
            }
        ],
    },
}


def test_apiserver_reports_the_pinned_release(api: Any) -> None:
    version = client.VersionApi(api).get_code()
    assert version.git_version == f"v{K8S_VERSION}"


def test_fake_gpu_nodes_carry_capacity_and_preset_labels(api: Any) -> None:
    nodes = client.CoreV1Api(api).list_node(label_selector="type=kwok").items
    assert len(nodes) == NODE_COUNT
    assert {n.metadata.labels[LABEL_TOPOLOGY_PRESET] for n in nodes} == set(NODE_PRESETS)
    for node in nodes:
        assert node.status.allocatable["nvidia.com/gpu"] == "8"
        assert any(c.type == "Ready" and c.status == "True" for c in node.status.conditions)


def test_cel_rule_rejects_a_bad_object_with_its_message(api: Any, namespace: str) -> None:
    extensions = client.ApiextensionsV1Api(api)
    try:
        extensions.create_custom_resource_definition(WIDGET_CRD)
    except ApiException as error:
        if error.status != 409:
            raise

    def established() -> bool:
        crd = extensions.read_custom_resource_definition("widgets.e2e.tidal.dev")
        return any(
            c.type == "Established" and c.status == "True" for c in crd.status.conditions or []
        )

    wait_for(established, "the Widget CRD to be established")
    objects = client.CustomObjectsApi(api)

    def widget(name: str, low: int, high: int) -> dict[str, Any]:
        return {
            "apiVersion": "e2e.tidal.dev/v1",
            "kind": "Widget",
            "metadata": {"name": name},
            "spec": {"minReplicas": low, "maxReplicas": high},
        }

    args = ("e2e.tidal.dev", "v1", namespace, "widgets")
    objects.create_namespaced_custom_object(*args, widget("good", 1, 3))
    with pytest.raises(ApiException) as rejected:
        objects.create_namespaced_custom_object(*args, widget("bad", 5, 2))
    assert rejected.value.status == 422
    assert "spec.minReplicas" in str(rejected.value.body)
    assert "minReplicas must not exceed maxReplicas" in str(rejected.value.body)


def test_tidal_scheduler_profile_binds_a_gpu_pod_and_kwok_runs_it(api: Any, namespace: str) -> None:
    core = client.CoreV1Api(api)
    core.create_namespaced_pod(namespace, gpu_pod("tp4", 4))

    def running() -> Any:
        pod = core.read_namespaced_pod("tp4", namespace)
        return pod if pod.status.phase == "Running" else None

    pod = wait_for(running, "pod tp4 to be bound and Running")
    assert pod.spec.node_name.startswith("gpu-node-")


def test_pod_wanting_more_gpus_than_any_node_stays_pending_with_a_reason(
    api: Any, namespace: str
) -> None:
    core = client.CoreV1Api(api)
    core.create_namespaced_pod(namespace, gpu_pod("too-big", 16))

    def unschedulable() -> Any:
        conditions = core.read_namespaced_pod("too-big", namespace).status.conditions or []
        return next((c for c in conditions if c.type == "PodScheduled"), None)

    condition = wait_for(unschedulable, "a PodScheduled condition on too-big")
    assert condition.status == "False"
    assert condition.reason == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in condition.message
    assert core.read_namespaced_pod("too-big", namespace).spec.node_name is None


def test_batch_pod_completes_after_its_kwok_delay(api: Any, namespace: str) -> None:
    core = client.CoreV1Api(api)
    pod = gpu_pod("batch", 1, annotations={"tidal.dev/kwok-complete-after": "1s"})
    core.create_namespaced_pod(namespace, pod)

    def phase() -> str | None:
        value: str = core.read_namespaced_pod("batch", namespace).status.phase
        return value if value == "Succeeded" else None

    wait_for(phase, "pod batch to succeed")
