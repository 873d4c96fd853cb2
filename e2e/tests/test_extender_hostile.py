"""Hostile and careless users against the real control plane and the extender process: forged
extender calls, forged reservations, bad annotations, and a restart on top of them. Each test
failed before the extender was hardened.

Nodes are DGX-1V: NVLink quads {0,1,2,3} and {4,5,6,7}.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from e2e.helpers import fresh_namespace, running_cluster, wait_for
from e2e.tests.test_extender import (
    BATCH,
    ONLINE,
    QUADS,
    assert_disjoint,
    bound,
    fill_cross_pattern,
    gpus_of,
    node_allocations,
    online,
    running_batch,
)
from tidal.devcluster import LocalCluster
from tidal.devcluster.nodes import gpu_pod, node_names

NODES = node_names(3, ["dgx1-v100"], prefix="hostile")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    yield from running_cluster(
        tmp_path_factory.mktemp("hostile-cluster"),
        NODES,
        {BATCH: 10, ONLINE: 1000},
        controller_manager=True,
        run_extender=True,
    )


@pytest.fixture
def ns(core: Any) -> Iterator[str]:
    yield from fresh_namespace(core, "hostile")


def call_extender(cluster: LocalCluster, verb: str, body: dict[str, Any]) -> Any:
    assert cluster.options.extender is not None
    request = urllib.request.Request(
        f"{cluster.options.extender.url_prefix}/{verb}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def api_object(core: Any, ns: str, name: str) -> dict[str, Any]:
    pod = core.read_namespaced_pod(name, ns)
    return dict(core.api_client.sanitize_for_serialization(pod))


def batch_pods(core: Any, ns: str) -> set[str]:
    pods = core.list_namespaced_pod(ns, label_selector="app=batch").items
    return {p.metadata.name for p in pods if p.metadata.deletion_timestamp is None}


def test_a_forged_filter_call_evicts_no_pod(core: Any, ns: str, cluster: LocalCluster) -> None:
    node = NODES[0][0]
    fill_cross_pattern(core, ns, node)
    # A pending batch TP4 pod: no free quad, and its priority may evict no batch pod.
    low = gpu_pod("low", 4, annotations={"tidal.dev/topology-mode": "guaranteed"})
    low["spec"]["priorityClassName"] = BATCH
    low["spec"]["nodeSelector"] = {"kubernetes.io/hostname": node}
    core.create_namespaced_pod(ns, low)
    wait_for(lambda: core.read_namespaced_pod("low", ns).status.conditions, "a scheduling attempt")
    forged = api_object(core, ns, "low")
    forged["spec"]["priority"] = 2_000_000_000  # the body lies about the priority
    answer = call_extender(cluster, "filter", {"Pod": forged, "NodeNames": [node]})
    assert answer["NodeNames"] == []
    made_up = copy.deepcopy(forged)
    made_up["metadata"].update(name="ghost", uid="00000000-0000-0000-0000-000000000000")
    assert (
        "does not exist"
        in call_extender(cluster, "filter", {"Pod": made_up, "NodeNames": [node]})["Error"]
    )
    bind = {"PodName": "low", "PodNamespace": ns, "PodUID": forged["metadata"]["uid"], "Node": node}
    assert "did not pass tidal's filter" in call_extender(cluster, "bind", bind)["Error"]
    time.sleep(2)
    assert batch_pods(core, ns) == {"b0", "b1", "b2", "b3"}
    assert core.read_namespaced_pod("low", ns).spec.node_name is None


def test_pod_creators_cannot_forge_a_reservation(core: Any, ns: str) -> None:
    node = NODES[1][0]
    record = {
        "node": node,
        "gpus": list(range(8)),
        "victims": [],
        "expiresAt": "2100-01-01T00:00:00Z",
    }
    squatter = gpu_pod("squatter", 1, annotations={"tidal.dev/reservation": json.dumps(record)})
    squatter["spec"]["schedulerName"] = "nobody"  # never bound: it only holds its "reservation"
    squatter["status"] = {
        "conditions": [
            {"type": "tidal.dev/reservation", "status": "True", "message": json.dumps(record)}
        ]
    }
    core.create_namespaced_pod(ns, squatter)
    # The API server resets a new pod's status; the annotation is no reservation.
    assert not core.read_namespaced_pod("squatter", ns).status.conditions
    core.create_namespaced_pod(ns, online("tp4", 4, node))
    assert gpus_of(bound(core, ns, "tp4")) in QUADS


def test_bad_annotations_neither_freeze_the_cache_nor_free_held_gpus(
    core: Any, ns: str, cluster: LocalCluster
) -> None:
    node = NODES[2][0]
    bad = running_batch("bad", node, [0, 1, 2, 3])
    bad["metadata"]["annotations"]["tidal.dev/checkpoint-interval-seconds"] = "abc"
    core.create_namespaced_pod(ns, bad)
    core.create_namespaced_pod(ns, running_batch("gone", node, [4, 5, 6, 7]))
    wait_for(lambda: batch_pods(core, ns) == {"bad", "gone"}, "batch pods")

    def warned() -> bool:
        events = core.list_namespaced_event(ns, field_selector="reason=InvalidField").items
        return any("checkpoint-interval-seconds" in e.message for e in events)

    assert wait_for(warned, "a Warning Event on the pod naming the field")
    # Events after the bad pod still apply: the freed quad goes to the next pod.
    core.delete_namespaced_pod("gone", ns, grace_period_seconds=0)
    first = gpu_pod("first", 4, annotations={"tidal.dev/topology-mode": "guaranteed"})
    first["spec"]["priorityClassName"] = BATCH
    first["spec"]["nodeSelector"] = {"kubernetes.io/hostname": node}
    core.create_namespaced_pod(ns, first)
    assert gpus_of(bound(core, ns, "first")) == {4, 5, 6, 7}
    # The bad pod's GPU annotation is corrupted too, then the extender restarts: it cannot
    # know which GPUs the pod holds, so it gives none of them away.
    core.patch_namespaced_pod("bad", ns, {"metadata": {"annotations": {"tidal.dev/gpus": "x"}}})
    cluster.restart("tidal-extender")
    second = copy.deepcopy(first)
    second["metadata"]["name"] = "second"
    core.create_namespaced_pod(ns, second)
    time.sleep(5)
    assert core.read_namespaced_pod("second", ns).spec.node_name is None
    # Once the annotation is right again, the pod's GPUs are known and the rest is free.
    core.patch_namespaced_pod(
        "bad", ns, {"metadata": {"annotations": {"tidal.dev/gpus": "0,1,2,3"}}}
    )
    core.delete_namespaced_pod("first", ns, grace_period_seconds=0)
    assert gpus_of(bound(core, ns, "second")) == {4, 5, 6, 7}
    assert_disjoint(node_allocations(core, node))


def kill_9(cluster: LocalCluster, name: str) -> None:
    component = cluster.components[name]
    assert component.pid is not None
    os.killpg(component.pid, signal.SIGKILL)
    component.stop()  # reaps it


def test_kill_9_and_a_control_plane_restart_lose_no_pod_and_double_allocate_nothing(
    core: Any, ns: str, cluster: LocalCluster
) -> None:
    node = NODES[0][0]
    core.create_namespaced_pod(ns, running_batch("held", node, [0, 1]))
    wait_for(lambda: batch_pods(core, ns) == {"held"}, "the running pod")
    kill_9(cluster, "tidal-extender")
    for name in ("kube-apiserver", "etcd"):  # etcd and the API server go down and come back
        cluster.components[name].stop()
    for name in ("etcd", "kube-apiserver", "tidal-extender"):
        cluster.components[name].start()
        cluster.components[name].wait_healthy(cluster.options.startup_timeout_s)
    for i in range(3):
        pod = gpu_pod(f"pair-{i}", 2)
        pod["spec"]["priorityClassName"] = BATCH
        pod["spec"]["nodeSelector"] = {"kubernetes.io/hostname": node}
        core.create_namespaced_pod(ns, pod)
    pairs = [gpus_of(bound(core, ns, f"pair-{i}")) for i in range(3)]
    assert all(len(p) == 2 and not p & {0, 1} for p in pairs)
    assert_disjoint(node_allocations(core, node))
    names = {p.metadata.name for p in core.list_namespaced_pod(ns).items}
    assert names == {"held", "pair-0", "pair-1", "pair-2"}
