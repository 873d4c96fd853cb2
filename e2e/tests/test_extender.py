"""The real kube-scheduler places and preempts GPU pods through tidal's extender.

Nodes are DGX-1V (hybrid cube-mesh): NVLink cliques of four are {0,1,2,3} and {4,5,6,7};
{2,3,6,7} is four GPUs by count but not a clique (2-7 and 3-6 have no NVLink).
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from e2e.helpers import fresh_namespace, running_cluster, wait_for
from tidal.devcluster import LocalCluster
from tidal.devcluster.nodes import gpu_pod, node_names

NODES = node_names(3, ["dgx1-v100"], prefix="cube")
QUADS = ({0, 1, 2, 3}, {4, 5, 6, 7})
BATCH, ONLINE = "tidal-e2e-batch", "tidal-e2e-online"


@pytest.fixture(scope="module")
def tidal_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    yield from running_cluster(
        tmp_path_factory.mktemp("tidal-cluster"),
        NODES,
        {BATCH: 10, ONLINE: 1000},
        controller_manager=True,
        run_extender=True,
    )


@pytest.fixture
def core(tidal_cluster: LocalCluster) -> Any:
    return client.CoreV1Api(tidal_cluster.api_client())


@pytest.fixture
def ns(core: Any) -> Iterator[str]:
    yield from fresh_namespace(core, "ext")


def gpus_of(pod: Any) -> set[int]:
    return {int(i) for i in pod.metadata.annotations["tidal.dev/gpus"].split(",")}


def online(name: str, gpus: int, node: str | None = None) -> dict[str, Any]:
    pod = gpu_pod(
        name,
        gpus,
        annotations={"tidal.dev/topology-mode": "guaranteed", "tidal.dev/topology-tier": "nvlink"},
    )
    pod["spec"]["priorityClassName"] = ONLINE
    if node:
        pod["spec"]["nodeSelector"] = {"kubernetes.io/hostname": node}
    return pod


def running_batch(name: str, node: str, gpus: list[int]) -> dict[str, Any]:
    """A batch pod already running on ``node`` holding exactly ``gpus`` (as bound by tidal)."""
    pod = gpu_pod(name, len(gpus), annotations={"tidal.dev/gpus": ",".join(map(str, gpus))})
    pod["spec"]["priorityClassName"] = BATCH
    pod["spec"]["nodeName"] = node
    pod["metadata"]["labels"] = {"app": "batch"}
    return pod


def reservation(core: Any, ns: str, name: str) -> tuple[str, str] | None:
    """The (status, reason) of the pod's tidal.dev/reservation condition, if any."""
    conditions = core.read_namespaced_pod(name, ns).status.conditions or []
    found = [(c.status, c.reason) for c in conditions if c.type == "tidal.dev/reservation"]
    return found[0] if found else None


def bound(core: Any, ns: str, name: str) -> Any:
    def probe() -> Any:
        pod = core.read_namespaced_pod(name, ns)
        return (
            pod if pod.spec.node_name and pod.metadata.annotations.get("tidal.dev/gpus") else None
        )

    return wait_for(probe, f"pod {name} to be bound with tidal.dev/gpus", timeout_s=60)


def test_extender_binds_guaranteed_pods_on_nvlink_cliques(core: Any, ns: str) -> None:
    core.create_namespaced_pod(ns, online("tp4-a", 4, NODES[0][0]))
    core.create_namespaced_pod(ns, online("tp4-b", 4, NODES[0][0]))
    first, second = bound(core, ns, "tp4-a"), bound(core, ns, "tp4-b")
    assert first.spec.node_name == second.spec.node_name == NODES[0][0]
    assert {frozenset(gpus_of(first)), frozenset(gpus_of(second))} == {frozenset(q) for q in QUADS}
    assert wait_for(
        lambda: core.read_namespaced_pod("tp4-a", ns).status.phase == "Running", "Running"
    )


def test_topology_only_conflict_is_resolved_by_the_extenders_own_preemption(
    core: Any, ns: str
) -> None:
    node = NODES[1][0]
    # GPUs 0,1,4,5 busy with batch pods: 4 free by count ({2,3,6,7}) but no free NVLink quad.
    for i, gpu in enumerate((0, 1, 4, 5)):
        core.create_namespaced_pod(ns, running_batch(f"batch-{i}", node, [gpu]))
    wait_for(
        lambda: all(p.status.phase == "Running" for p in core.list_namespaced_pod(ns).items),
        "batch pods to run",
    )
    core.create_namespaced_pod(ns, online("tp4", 4, node))
    pod = bound(core, ns, "tp4")
    assert pod.spec.node_name == node
    assert gpus_of(pod) in QUADS
    survivors = {
        p.metadata.name for p in core.list_namespaced_pod(ns, label_selector="app=batch").items
    }
    assert len(survivors) == 2, survivors  # exactly the two batch pods on the freed quad went
    events = core.list_namespaced_event(ns, field_selector="reason=Preempted").items
    assert len(events) == 2
    assert all(f"{ns}/tp4" in e.message for e in events)
    assert wait_for(lambda: reservation(core, ns, "tp4") == ("False", "Bound"), "reservation ended")


def test_count_conflict_goes_through_the_preempt_verb(core: Any, ns: str) -> None:
    node = NODES[2][0]
    # Eight 1-GPU batch pods fill the node: a TP4 pod lacks GPUs by count, so kube-scheduler's
    # own preemption runs and our preempt verb picks the victims (one NVLink quad).
    for gpu in range(8):
        core.create_namespaced_pod(ns, running_batch(f"fill-{gpu}", node, [gpu]))
    wait_for(
        lambda: (
            len([p for p in core.list_namespaced_pod(ns).items if p.status.phase == "Running"]) == 8
        ),
        "fill pods to run",
    )
    core.create_namespaced_pod(ns, online("tp4-count", 4, node))
    pod = bound(core, ns, "tp4-count")
    assert gpus_of(pod) in QUADS
    left = core.list_namespaced_pod(ns, label_selector="app=batch").items
    assert len(left) == 4
    held = set().union(*(gpus_of(p) for p in left))
    assert held.isdisjoint(gpus_of(pod))


def test_malformed_extender_requests_get_400_with_a_reason(tidal_cluster: LocalCluster) -> None:
    url = tidal_cluster.options.extender.url_prefix if tidal_cluster.options.extender else ""
    request = urllib.request.Request(
        f"{url}/filter", data=b'{"Pod": 3}', headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(request, timeout=5)
    assert answer.value.code == 400
    assert b"Pod" in answer.value.read()


def fill_cross_pattern(core: Any, ns: str, node: str, terminate_after: str | None = None) -> None:
    """Batch pods on GPUs 0,1,4,5: four GPUs free by count, no free NVLink quad."""
    for i, gpu in enumerate((0, 1, 4, 5)):
        pod = running_batch(f"b{i}", node, [gpu])
        pod["metadata"]["labels"]["slot"] = f"b{i}"
        if terminate_after:
            # A grace period makes deletion graceful; KWOK then removes the pod after the delay.
            pod["spec"]["terminationGracePeriodSeconds"] = 30
            pod["metadata"]["annotations"]["tidal.dev/kwok-terminate-after"] = terminate_after
        core.create_namespaced_pod(ns, pod)
    wait_for(
        lambda: all(p.status.phase == "Running" for p in core.list_namespaced_pod(ns).items),
        "batch pods to run",
    )


def node_allocations(core: Any, node: str) -> list[set[int]]:
    pods = core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={node}").items
    return [gpus_of(p) for p in pods if p.metadata.deletion_timestamp is None]


def assert_disjoint(sets: list[set[int]]) -> None:
    seen: set[int] = set()
    for gpus in sets:
        assert not gpus & seen, f"GPUs {gpus & seen} allocated twice"
        seen |= gpus


def test_a_pdb_steers_the_preemption_to_the_other_clique(
    core: Any, ns: str, tidal_cluster: LocalCluster
) -> None:
    node = NODES[1][0]
    fill_cross_pattern(core, ns, node)
    policy = client.PolicyV1Api(tidal_cluster.api_client())
    policy.create_namespaced_pod_disruption_budget(
        ns,
        {
            "metadata": {"name": "keep-b0"},
            "spec": {"minAvailable": 1, "selector": {"matchLabels": {"slot": "b0"}}},
        },
    )
    wait_for(
        lambda: (
            (
                policy.read_namespaced_pod_disruption_budget("keep-b0", ns).status.current_healthy
                or 0
            )
            == 1
        ),
        "the disruption controller to count the PDB's pods",
    )
    core.create_namespaced_pod(ns, online("tp4", 4, node))
    assert gpus_of(bound(core, ns, "tp4")) == {4, 5, 6, 7}
    left = {p.metadata.name for p in core.list_namespaced_pod(ns, label_selector="app=batch").items}
    assert left == {"b0", "b1"}


def test_two_preemptors_racing_for_one_node_never_share_a_gpu(core: Any, ns: str) -> None:
    node = NODES[1][0]
    fill_cross_pattern(core, ns, node)
    core.create_namespaced_pod(ns, online("tp4-x", 4, node))
    core.create_namespaced_pod(ns, online("tp4-y", 4, node))
    x, y = bound(core, ns, "tp4-x"), bound(core, ns, "tp4-y")
    assert {frozenset(gpus_of(x)), frozenset(gpus_of(y))} == {frozenset(q) for q in QUADS}
    assert core.list_namespaced_pod(ns, label_selector="app=batch").items == []
    assert_disjoint(node_allocations(core, node))


def test_extender_restart_mid_preemption_loses_nothing(
    core: Any, ns: str, tidal_cluster: LocalCluster
) -> None:
    node = NODES[1][0]
    # Victims take 4 s to terminate, so the restart lands while the reservation is pending.
    fill_cross_pattern(core, ns, node, terminate_after="4s")
    core.create_namespaced_pod(ns, online("tp4", 4, node))
    wait_for(
        lambda: reservation(core, ns, "tp4") == ("True", "GPUsReserved"),
        "the reservation on the preemptor",
    )
    tidal_cluster.restart("tidal-extender")
    # Meanwhile a second pod wants 4 GPUs on that node: it must not get the reserved quad.
    core.create_namespaced_pod(ns, online("late", 4, node))
    pod = bound(core, ns, "tp4")
    assert gpus_of(pod) in QUADS
    assert wait_for(lambda: reservation(core, ns, "tp4") == ("False", "Bound"), "reservation ended")
    assert_disjoint(node_allocations(core, node))
    names = {p.metadata.name for p in core.list_namespaced_pod(ns).items}
    assert {"tp4", "late"} <= names  # no pod lost
